"""Phases: whether "rollout"-only or "training"-only injections are active right now.

``with hwnoise.phase("rollout"): model.generate(...)`` marks generation; ``phase("training")`` the
loss pass. An injection made with ``phase="rollout"`` noises only inside a rollout block, one with
``phase="training"`` only inside a training block, and ``phase="both"`` (the default) always.
Outside any phase block only "both" injections are active: phase-restricted noise is opt-in,
so it never leaks into validation code that forgot to declare a phase.

The current phase is a ``contextvars`` variable: per thread and per asyncio task; a new thread
starts outside any phase. Operator-level backward noise follows the phase of its forward call.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["INJECTION_PHASES", "PHASES", "check_phase", "current_phase", "phase", "phase_active"]

PHASES = ("rollout", "training")  # what a block can declare
INJECTION_PHASES = PHASES + ("both",)  # when an injection is active

_current: ContextVar[str | None] = ContextVar("hwnoise_phase", default=None)


def check_phase(value, what: str = "phase") -> str:
    """``value`` if it is a valid injection phase, else a ValueError naming the accepted ones."""
    if value not in INJECTION_PHASES:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(INJECTION_PHASES)}")
    return value


def current_phase() -> str | None:
    """The phase declared by the innermost ``phase(...)`` block, or None outside any."""
    return _current.get()


def phase_active(injection_phase: str) -> bool:
    """Whether an injection made with ``phase=injection_phase`` applies now."""
    return injection_phase == "both" or injection_phase == _current.get()


@contextmanager
def phase(name: str):
    """Declare the phase of the enclosed code: ``"rollout"`` or ``"training"`` (blocks nest)."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; known: {', '.join(PHASES)}")
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)
