"""Adaptive Quantization Noise (QeRL): sigma schedules and noise on norm (and linear) weights.

``AQN(schedule, ...)`` draws fresh Gaussian noise per step into the selected weights from an fp32
master copy and restores them exactly; the schedules say how strong it is at each step.
"""

from . import schedules
from .multipliers import LayerMultipliers
from .noise import AQN, LINEAR_SIGMA_WARNING, NOISE_ROUNDING, NoiseStats
from .schedules import Constant, EpochAwareDecay, Schedule, StagedDecay

__all__ = [
    "AQN",
    "LINEAR_SIGMA_WARNING",
    "Constant",
    "EpochAwareDecay",
    "LayerMultipliers",
    "NOISE_ROUNDING",
    "NoiseStats",
    "Schedule",
    "StagedDecay",
    "schedules",
]
