"""Progress callbacks: ``on_progress(label, done, total)`` everywhere (README, "Names").

``progress_reporter`` turns the callbacks a long-running function was given into one
``report(phase, item, done, total)``: it calls ``on_progress(f"{phase} {item}", done, total)`` and,
for one release, the old ``on_step(phase, item)`` (which warns once, when it is given).
"""

from __future__ import annotations

from collections.abc import Callable

from .compat import warn_renamed

__all__ = ["ProgressCallback", "progress_reporter"]

ProgressCallback = Callable[[str, int, int], None]


def progress_reporter(on_progress: ProgressCallback | None, on_step: Callable[[str, str], None] | None = None,
                      *, what: str = "") -> Callable[[str, str, int, int], None]:
    """One ``report(phase, item, done, total)`` for ``on_progress`` and the deprecated ``on_step``."""
    for name, cb in (("on_progress", on_progress), ("on_step", on_step)):
        if cb is not None and not callable(cb):
            raise TypeError(f"{name} must be callable, got {type(cb).__name__}")
    if on_step is not None:
        warn_renamed("on_step(phase, name)", "on_progress(label, done, total)", stacklevel=4, what=what)

    def report(phase: str, item: str, done: int, total: int) -> None:
        if on_step is not None:
            on_step(phase, item)
        if on_progress is not None:
            on_progress(f"{phase} {item}", done, total)

    return report
