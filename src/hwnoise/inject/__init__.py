"""Error injection: module level (hooks on input, output or weight) and operator level (noisy ops
whose backward is noisy too), switched on in-process with context managers or process-wide from
environment variables. See ``hooks`` (``inject``), ``ops`` (``noisy_ops``), ``phases`` (``phase``),
``emulation`` (``Emulation``: one hardware condition applied to a model and undone), ``env`` (``enable_from_env``) and ``keys`` (how every draw is keyed).
"""

from .emulation import EMULATION_WHERE, Emulation, EmulationStats
from .env import config_from_env, disable_from_env, enable_from_env
from .hooks import WHERE, Injection, SiteStats, inject
from .ops import ALL_OPS, DEFAULT_OPS, NoisyOps, noisy_ops, register_op
from .phases import current_phase, phase

# hwnoise.noisy_ops.enable_from_env(): the factory carries the environment switch.
noisy_ops.enable_from_env = enable_from_env
noisy_ops.disable_from_env = disable_from_env

__all__ = [
    "ALL_OPS", "DEFAULT_OPS", "EMULATION_WHERE", "WHERE", "Emulation", "EmulationStats", "Injection", "NoisyOps", "SiteStats", "config_from_env", "current_phase",
    "disable_from_env", "enable_from_env", "inject", "noisy_ops", "phase", "register_op",
]
