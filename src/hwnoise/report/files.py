"""Kept for imports written before ``hwnoise.io``: every atomic write lives there."""

from __future__ import annotations

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
