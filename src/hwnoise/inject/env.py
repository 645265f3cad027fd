"""Operator-level noise switched on by environment variables, for worker processes.

    HWNOISE_ERROR     error model: relative | absolute | bias | truncation | quantize, or a full
                      spec such as "relative:0.05", "truncation:mbits=7", "quantize:mxfp4" (required)
    HWNOISE_SCALE     the scale of relative / absolute / bias (required for those unless in the spec)
    HWNOISE_OPS       "linear,matmul,bmm" (default) or "all" or any comma-separated op names
    HWNOISE_SEED      integer (default 0)
    HWNOISE_PHASE     both (default) | rollout | training
    HWNOISE_FORWARD   1 (default) | 0      HWNOISE_BACKWARD   1 (default) | 0

``enable_from_env()`` enters the mode and never exits it: noise stays on for the rest of the
process (the thread that called it: torch function modes are per thread; Ray actors and verl
workers run their calls on that thread). A malformed value raises ``EnvironmentError`` naming
the variable and the accepted values: a worker never runs clean by accident.
"""

from __future__ import annotations

import os

from .. import errors
from .ops import ALL_OPS, NoisyOps
from .phases import INJECTION_PHASES

__all__ = ["ENV_VARS", "HwnoiseEnvError", "config_from_env", "disable_from_env", "enable_from_env"]

ENV_VARS = ("HWNOISE_OPS", "HWNOISE_ERROR", "HWNOISE_SCALE", "HWNOISE_SEED", "HWNOISE_PHASE",
            "HWNOISE_FORWARD", "HWNOISE_BACKWARD")
_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

_enabled: NoisyOps | None = None


class HwnoiseEnvError(ValueError, EnvironmentError):
    """A HWNOISE_* variable is malformed (a ValueError too)."""


def _bad(var: str, value: str, accepted: str, detail: str = "") -> HwnoiseEnvError:
    extra = f" ({detail})" if detail else ""
    return HwnoiseEnvError(f"{var}={value!r} is not valid{extra}; accepted: {accepted}")


def config_from_env(environ=None) -> dict | None:
    """The ``noisy_ops`` arguments the environment asks for, or None when noise is not requested."""
    env = os.environ if environ is None else environ
    values = {k: env[k] for k in ENV_VARS if env.get(k, "") != ""}
    if not values:
        return None
    if "HWNOISE_ERROR" not in values:
        given = ", ".join(sorted(values))
        raise HwnoiseEnvError(f"{given} set but HWNOISE_ERROR is not; set HWNOISE_ERROR to one of "
                              f"{', '.join(errors.names())} (with HWNOISE_SCALE), or unset {given}")
    text = values["HWNOISE_ERROR"]
    scale = None
    if "HWNOISE_SCALE" in values:
        try:
            scale = float(values["HWNOISE_SCALE"])
        except ValueError:
            raise _bad("HWNOISE_SCALE", values["HWNOISE_SCALE"], "a number >= 0, e.g. 0.05") from None
        if scale.is_integer() and text.strip().lower().startswith("trunc"):
            scale = int(scale)  # truncation: an integer scale is the number of mantissa bits
    try:
        error = errors.parse(text, scale)
    except ValueError as exc:
        raise _bad("HWNOISE_ERROR", text, f"{', '.join(errors.names())}, or a spec such as 'relative:0.05' "
                   "with HWNOISE_SCALE for a bare name", str(exc)) from None
    ops_text = values.get("HWNOISE_OPS", "linear,matmul,bmm")
    ops = "all" if ops_text.strip() == "all" else tuple(o.strip() for o in ops_text.split(",") if o.strip())
    if ops != "all" and (not ops or any(o not in ALL_OPS for o in ops)):
        raise _bad("HWNOISE_OPS", ops_text, f"'all' or comma-separated names from {', '.join(ALL_OPS)}")
    seed_text = values.get("HWNOISE_SEED", "0")
    try:
        seed = int(seed_text)
    except ValueError:
        raise _bad("HWNOISE_SEED", seed_text, "an integer") from None
    phase = values.get("HWNOISE_PHASE", "both").strip()
    if phase not in INJECTION_PHASES:
        raise _bad("HWNOISE_PHASE", phase, ", ".join(INJECTION_PHASES))
    flags = {}
    for var, arg in (("HWNOISE_FORWARD", "forward"), ("HWNOISE_BACKWARD", "backward")):
        raw = values.get(var, "1")
        if raw.strip().lower() not in _FLAGS:
            raise _bad(var, raw, "1/0, true/false, yes/no, on/off")
        flags[arg] = _FLAGS[raw.strip().lower()]
    return {"error": error, "ops": ops, "seed": seed, "phase": phase, **flags}


def enable_from_env(environ=None) -> NoisyOps | None:
    """Enter ``noisy_ops`` as the environment asks, for the rest of this process (thread).

    Returns the entered mode, or None when no HWNOISE_* variable is set. Calling it again returns
    the mode already entered (the environment is read once).
    """
    global _enabled
    if _enabled is not None:
        return _enabled
    config = config_from_env(environ)
    if config is None:
        return None
    mode = NoisyOps(**config)
    mode.__enter__()
    _enabled = mode
    return mode


def disable_from_env() -> None:
    """Leave the mode ``enable_from_env`` entered (for tests and notebooks; workers never need it)."""
    global _enabled
    if _enabled is not None:
        mode, _enabled = _enabled, None
        mode.__exit__(None, None, None)
