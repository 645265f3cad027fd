"""Error injection: module level (hooks on input, output or weight) and operator level (noisy ops
whose backward is noisy too), switched on in-process with context managers or process-wide from
environment variables. See ``hooks`` (``inject``), ``ops`` (``noisy_ops``), ``phases`` (``phase``),
``env`` (``enable_from_env``) and ``keys`` (how every draw is keyed).

``Emulation`` (one hardware condition applied to a model and undone) lives one layer up, in
``hwnoise.emulation``; ``hwnoise.inject.Emulation`` / ``EmulationStats`` / ``EMULATION_WHERE`` and
the module path ``hwnoise.inject.emulation`` still resolve there, with a deprecation warning.
"""

from ..compat import module_aliases
from .env import config_from_env, disable_from_env, enable_from_env
from .hooks import WHERE, Injection, SiteStats, inject
from .ops import ALL_OPS, DEFAULT_OPS, NoisyOps, noisy_ops, register_op, resolve_ops
from .phases import INJECTION_PHASES, PHASES, current_phase, phase

# hwnoise.noisy_ops.enable_from_env(): the factory carries the environment switch.
noisy_ops.enable_from_env = enable_from_env
noisy_ops.disable_from_env = disable_from_env

# Moved up to hwnoise.emulation (it imports this package; importing it here would be upward).
__getattr__ = module_aliases(__name__, {
    "Emulation": "hwnoise.emulation:Emulation",
    "EmulationStats": "hwnoise.emulation:EmulationStats",
    "EMULATION_WHERE": "hwnoise.emulation:EMULATION_WHERE",
})

__all__ = [
    "ALL_OPS", "DEFAULT_OPS", "INJECTION_PHASES", "PHASES", "WHERE", "Injection", "NoisyOps", "SiteStats", "config_from_env", "current_phase",
    "disable_from_env", "enable_from_env", "inject", "noisy_ops", "phase", "register_op", "resolve_ops",
]
