"""Sigma schedules for Adaptive Quantization Noise.

``StagedDecay`` is QeRL's schedule: K stages over T steps, the first a warm-up at sigma 0, then a
geometric decay from ``sigma_start`` to ``sigma_end``:

    trend[i] = sigma_start * (sigma_end / sigma_start) ** (i / (K - 2)),  i = 0 .. K-2
    j = floor(min(t, T) / (T / K))
    sigma(t) = 0 if j == 0 else trend[min(j - 1, K - 2)]

``EpochAwareDecay`` restarts that shape every epoch (each with its own warm-up), epoch e decaying
from sigma_e to sigma_{e+1}, sigma_e = sigma_start * (sigma_end / sigma_start) ** (e / E).
``Constant`` is one sigma at every step. Schedules are frozen dataclasses validated on creation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Constant", "EpochAwareDecay", "Schedule", "StagedDecay"]

MIN_STAGES = 2  # one warm-up stage plus at least one noisy stage


def _check_sigma(name: str, value, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if positive and value <= 0:
        raise ValueError(
            f"{name} must be > 0 for a geometric decay (the formula divides by it and takes its "
            f"ratio to a power); got {value!r}. For noise that ends at zero use a small value such as 1e-6"
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (a standard deviation); got {value!r}")


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")


def _check_step(step, total_steps) -> None:
    _check_count("total_steps", total_steps, 1)
    _check_count("step", step, 0)


def _staged(step: int, total_steps: int, stages: int, sigma_start: float, sigma_end: float) -> float:
    """The staged-decay formula for one run of ``total_steps`` steps."""
    # floor(min(t, T) / (T / K)) in integers: float division misplaces stage boundaries (58 / 10).
    interval = min(step, total_steps) * stages // total_steps
    if interval == 0:
        return 0.0
    last = stages - 2
    i = min(interval - 1, last)
    if last == 0:  # K = 2: a single noisy stage at sigma_start (i / (K - 2) would be 0 / 0)
        return float(sigma_start)
    return sigma_start * (sigma_end / sigma_start) ** (i / last)


class Schedule:
    """Base of the sigma schedules: ``sigma_at`` per step and ``table`` for printing or plotting."""

    def sigma_at(self, step: int, total_steps: int, steps_per_epoch: int | None = None) -> float:
        """Sigma at ``step`` (0-based) of a run of ``total_steps``; steps past the end keep the last value."""
        raise NotImplementedError

    def table(self, total_steps: int, steps_per_epoch: int | None = None) -> list[tuple[int, float]]:
        """``[(step, sigma), ...]`` for every step of the run, 0 .. total_steps - 1."""
        _check_count("total_steps", total_steps, 1)
        return [(step, self.sigma_at(step, total_steps, steps_per_epoch)) for step in range(total_steps)]


def _check_decay(sigma_start, sigma_end) -> None:
    """Both sigmas positive (the geometric decay has no 0**0) and decreasing."""
    _check_sigma("sigma_start", sigma_start, positive=True)
    _check_sigma("sigma_end", sigma_end, positive=True)
    if sigma_start < sigma_end:
        raise ValueError(
            f"sigma_start ({sigma_start!r}) is below sigma_end ({sigma_end!r}); "
            "a decay needs sigma_start >= sigma_end (were they swapped?)"
        )


@dataclass(frozen=True)
class StagedDecay(Schedule):
    """QeRL's staged geometric decay: a warm-up stage at sigma 0, then K-1 stages from start to end.

    ``sigma_start >= sigma_end > 0`` (a decay; an increase is refused as a likely argument swap),
    ``stages >= 2``. With ``stages=2`` the single noisy stage sits at ``sigma_start``.
    ``steps_per_epoch`` is accepted and ignored, so all schedules share one call signature.
    """

    sigma_start: float
    sigma_end: float
    stages: int = 10

    def __post_init__(self):
        _check_decay(self.sigma_start, self.sigma_end)
        _check_count("stages", self.stages, MIN_STAGES)

    def sigma_at(self, step, total_steps, steps_per_epoch=None) -> float:
        _check_step(step, total_steps)
        return _staged(step, total_steps, self.stages, self.sigma_start, self.sigma_end)


@dataclass(frozen=True)
class EpochAwareDecay(Schedule):
    """The staged decay restarted every epoch, each epoch opening with its own sigma-0 warm-up.

    With E = ceil(total_steps / steps_per_epoch) epochs, epoch e decays from
    sigma_e = sigma_start * (sigma_end / sigma_start) ** (e / E) to sigma_{e+1} over its own steps
    (the last epoch may be shorter; it is compressed so that the run still ends at sigma_end).
    ``steps_per_epoch`` is required by ``sigma_at`` and ``table``.
    """

    sigma_start: float
    sigma_end: float
    stages_per_epoch: int = 5

    def __post_init__(self):
        _check_decay(self.sigma_start, self.sigma_end)
        _check_count("stages_per_epoch", self.stages_per_epoch, MIN_STAGES)

    def epoch_sigma(self, epoch: int, epochs: int) -> float:
        """sigma_e, the value epoch ``epoch`` of ``epochs`` starts its decay from."""
        return self.sigma_start * (self.sigma_end / self.sigma_start) ** (epoch / epochs)

    def sigma_at(self, step, total_steps, steps_per_epoch=None) -> float:
        _check_step(step, total_steps)
        if steps_per_epoch is None:
            raise ValueError("EpochAwareDecay needs steps_per_epoch (an integer >= 1)")
        _check_count("steps_per_epoch", steps_per_epoch, 1)
        epochs = -(-total_steps // steps_per_epoch)
        t = min(step, total_steps)
        epoch = min(t // steps_per_epoch, epochs - 1)  # t == T belongs to the last epoch's end
        start = epoch * steps_per_epoch
        length = min(steps_per_epoch, total_steps - start)
        return _staged(
            t - start,
            length,
            self.stages_per_epoch,
            self.epoch_sigma(epoch, epochs),
            self.epoch_sigma(epoch + 1, epochs),
        )


@dataclass(frozen=True)
class Constant(Schedule):
    """The same sigma at every step (no warm-up)."""

    sigma: float

    def __post_init__(self):
        _check_sigma("sigma", self.sigma)

    def sigma_at(self, step, total_steps, steps_per_epoch=None) -> float:
        _check_step(step, total_steps)
        return float(self.sigma)
