"""Kept for imports written before ``hwnoise.io``: every atomic write lives there. The names resolve
to ``hwnoise.io``'s, with a deprecation warning, until hwnoise 0.3."""

from __future__ import annotations

from ..compat import module_aliases

__getattr__ = module_aliases(__name__, {
    "atomic_write_bytes": "hwnoise.io:atomic_write_bytes",
    "atomic_write_json": "hwnoise.io:atomic_write_json",
    "atomic_write_text": "hwnoise.io:atomic_write_text",
})
