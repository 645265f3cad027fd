"""Results: JSON is the source of truth; tables, HTML and PNG plots are views of it."""

from .files import atomic_write_json, atomic_write_text

__all__ = ["atomic_write_json", "atomic_write_text"]
