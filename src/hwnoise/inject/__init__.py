"""Error injection: module level (hooks on input, output or weight) and operator level (noisy ops
whose backward is noisy too), switched on in-process with context managers or process-wide from
environment variables. See ``hooks`` (``inject``), ``ops`` (``noisy_ops``), ``phases`` (``phase``),
``env`` (``enable_from_env``) and ``keys`` (how every draw is keyed).

``Emulation`` (one hardware condition applied to a model and undone) lives one layer up, in
``hwnoise.emulation``; the one static swap it and the scan use is ``hwnoise.inject.swap``.
"""

from .env import config_from_env, disable_from_env, enable_from_env
from .hooks import WHERE, Injection, SiteStats, inject
from .ops import ALL_OPS, DEFAULT_OPS, NoisyOps, noisy_ops, register_op, resolve_ops
from .phases import INJECTION_PHASES, PHASES, current_phase, phase

# hwnoise.noisy_ops.enable_from_env(): the factory carries the environment switch.
noisy_ops.enable_from_env = enable_from_env
noisy_ops.disable_from_env = disable_from_env

__all__ = [
    "ALL_OPS", "DEFAULT_OPS", "INJECTION_PHASES", "PHASES", "WHERE", "Injection", "NoisyOps", "SiteStats", "config_from_env", "current_phase",
    "disable_from_env", "enable_from_env", "inject", "noisy_ops", "phase", "register_op", "resolve_ops",
]
