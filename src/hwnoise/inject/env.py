"""Operator-level noise switched on by environment variables, for worker processes.

    HWNOISE_ERROR     error model: relative | absolute | bias | truncation | quantize, or a full
                      spec such as "relative:0.05", "truncation:mbits=7", "quantize:mxfp4" (required)
    HWNOISE_SCALE     the scale of relative / absolute / bias (required for those unless in the spec;
                      a spec that carries its own scale and HWNOISE_SCALE together are refused)
    HWNOISE_OPS       "linear,matmul,bmm" (default) or "all" or any comma-separated op names
    HWNOISE_SEED      integer (default 0); each process keys its draws with its own seed derived
                      from it, its rank and its replica (``hwnoise.inject.keys.process_seed``)
    HWNOISE_PHASE     both (default) | rollout | training
    HWNOISE_FORWARD   1 (default) | 0      HWNOISE_BACKWARD   1 (default) | 0

``enable_from_env()`` switches the noise on for the rest of the process, in every thread that
computes: torch function modes are per thread, and Ray async actors and verl workers run their
methods on an asyncio loop in another thread than the one that imported ``hwnoise.autoload``.
One mode (one step counter, one ``stats()``) is entered

- on the calling thread, at once;
- on every thread started through ``threading`` afterwards (a ``Thread`` subclass included: the
  mode is entered before ``run``), so bare ``F.linear`` calls there are noised too;
- on any other thread (threads started before, threads made by C++ thread pools) at its first
  ``nn.Module`` call, through a global module forward pre-hook; a bare ``F.linear`` on such a
  thread before any module ran computes clean.

On each thread the mode goes to the bottom of that thread's mode stack, below any ``noisy_ops``
block already open there, so scoped blocks still nest and exit per thread. The step counter is
shared: with several threads computing at once, which call gets which step depends on their
interleaving (the same noise distribution, exact replay when one thread computes at a time).
A malformed value raises ``EnvironmentError`` naming the variable and the accepted values: a
worker never runs clean by accident.
"""

from __future__ import annotations

import os
import threading

import torch

from .. import errors
from .ops import ALL_OPS, NoisyOps, resolve_ops
from .phases import INJECTION_PHASES

__all__ = ["ENV_VARS", "HwnoiseEnvError", "config_from_env", "disable_from_env", "enable_from_env"]

ENV_VARS = ("HWNOISE_OPS", "HWNOISE_ERROR", "HWNOISE_SCALE", "HWNOISE_SEED", "HWNOISE_PHASE",
            "HWNOISE_FORWARD", "HWNOISE_BACKWARD")
_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

_enabled: NoisyOps | None = None
_thread_state = threading.local()  # .mode: the environment mode entered on this thread
_module_hook = None


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
    name, colon, params = text.strip().partition(":")
    if "HWNOISE_SCALE" in values and colon and params.strip():
        # Two sources for one parameter: neither may silently win.
        raise HwnoiseEnvError(
            f"HWNOISE_ERROR={text!r} already gives its parameters and HWNOISE_SCALE={values['HWNOISE_SCALE']!r} "
            f"is set too; give the scale once: HWNOISE_ERROR={name.strip()!r} with HWNOISE_SCALE, or "
            f"HWNOISE_ERROR={text!r} without HWNOISE_SCALE")
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
    try:
        ops = "all" if ops_text.strip() == "all" else resolve_ops(ops_text)  # the one op-list parser
    except ValueError:
        raise _bad("HWNOISE_OPS", ops_text, f"'all' or comma-separated names from {', '.join(ALL_OPS)}") from None
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


def _enter_on_this_thread(mode: NoisyOps) -> None:
    """Put ``mode`` at the bottom of this thread's torch function mode stack (once per thread)."""
    if getattr(_thread_state, "mode", None) is mode:
        return
    above = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    torch._C._push_on_torch_function_stack(mode)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
    _thread_state.mode = mode


def _leave_on_this_thread(mode: NoisyOps) -> None:
    """Take ``mode`` out of this thread's mode stack, wherever it sits, keeping the others' order."""
    stack = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    for other in reversed(stack):
        if other is not mode:
            torch._C._push_on_torch_function_stack(other)
    if getattr(_thread_state, "mode", None) is mode:
        _thread_state.mode = None


def _module_pre_hook(module, args):
    # Every nn.Module call of every thread: enter the mode on threads that do not have it yet.
    if torch.compiler.is_compiling():  # traced code runs inside the mode of the thread that runs it
        return None
    mode = _enabled
    if mode is not None and getattr(_thread_state, "mode", None) is not mode:
        _enter_on_this_thread(mode)
    return None


_ORIGINAL_BOOTSTRAP = threading.Thread._bootstrap_inner


def _bootstrap_inner(self):
    # A thread started after enable_from_env(): the mode is on before its run() starts.
    mode = _enabled
    if mode is not None:
        _enter_on_this_thread(mode)
    return _ORIGINAL_BOOTSTRAP(self)


def enable_from_env(environ=None) -> NoisyOps | None:
    """Switch ``noisy_ops`` on as the environment asks, for the rest of this process (every thread).

    Returns the mode, or None when no HWNOISE_* variable is set. Calling it again returns the
    mode already enabled (the environment is read once).
    """
    global _enabled, _module_hook
    if _enabled is not None:
        return _enabled
    config = config_from_env(environ)
    if config is None:
        return None
    mode = NoisyOps(**config)
    mode._activate()
    _enabled = mode
    _enter_on_this_thread(mode)
    _module_hook = torch.nn.modules.module.register_module_forward_pre_hook(_module_pre_hook)
    threading.Thread._bootstrap_inner = _bootstrap_inner
    return mode


def disable_from_env() -> None:
    """Switch the environment's noise off (for tests and notebooks; workers never need it).

    The mode leaves this thread's stack; on other threads it stays in the stack but passes every
    call through (a mode cannot be taken out of another thread's stack).
    """
    global _enabled, _module_hook
    if _enabled is None:
        return
    mode, _enabled = _enabled, None
    if threading.Thread._bootstrap_inner is _bootstrap_inner:
        threading.Thread._bootstrap_inner = _ORIGINAL_BOOTSTRAP
    if _module_hook is not None:
        _module_hook.remove()
        _module_hook = None
    _leave_on_this_thread(mode)
    mode._table = {}  # where it stays in another thread's stack, every call passes through
    mode._retire()
