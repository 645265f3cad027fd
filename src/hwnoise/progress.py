"""Progress callbacks: ``on_progress(label, done, total)`` everywhere.

``progress_reporter`` turns the callback a long-running function was given into one
``report(phase, item, done, total)``, which calls ``on_progress(f"{phase} {item}", done, total)``.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ProgressCallback", "progress_reporter"]

ProgressCallback = Callable[[str, int, int], None]


def progress_reporter(on_progress: ProgressCallback | None, *, what: str = "") -> Callable[[str, str, int, int], None]:
    """One ``report(phase, item, done, total)`` for ``on_progress`` (None: report does nothing).

    Args:
        on_progress: ``on_progress(label, done, total)`` or None.
        what: the caller's name, for the error when ``on_progress`` is not callable.

    Example: ``report = progress_reporter(print); report("metrics", "layers.0.mlp", 1, 30)``
    prints ``metrics layers.0.mlp 1 30``.
    """
    if on_progress is not None and not callable(on_progress):
        raise TypeError(f"on_progress{f' of {what}' if what else ''} must be callable, got {type(on_progress).__name__}")

    def report(phase: str, item: str, done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(f"{phase} {item}", done, total)

    return report
