"""Results: JSON is the source of truth; tables, HTML and PNG plots are views of it."""

from ..io import atomic_write_json, atomic_write_text  # the one atomic writer, hwnoise.io

__all__ = ["atomic_write_json", "atomic_write_text"]
