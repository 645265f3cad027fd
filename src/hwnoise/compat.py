"""Old names kept for one release: keyword arguments, module attributes and config keys that were
renamed when the public API settled on one name per concept (README, "Names").

Every rename goes through this module, so every old name warns the same way: a
``DeprecationWarning`` (a ``HwnoiseDeprecationWarning``) naming the old name, the new one and the
release that drops it, pointing at the caller's line.

- ``renamed_kwargs(fmt="format")``: a decorator; ``f(fmt=x)`` warns and calls ``f(format=x)``;
  giving both is an error naming both.
- ``module_aliases(__name__, {"METRICS": "ANSWER_METRICS"})``: returns a module ``__getattr__``
  that resolves the old attribute to the new one, with the warning.
- ``warn_renamed(old, new)``: the warning itself, for places that translate old forms by hand
  (config keys, CLI options).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping

__all__ = ["REMOVED_IN", "HwnoiseDeprecationWarning", "module_aliases", "renamed_kwargs", "warn_renamed"]

REMOVED_IN = "0.3"


class HwnoiseDeprecationWarning(DeprecationWarning):
    """An old hwnoise name was used; it still works until ``REMOVED_IN``."""


def warn_renamed(old: str, new: str, *, stacklevel: int = 3, what: str = "") -> None:
    """Warn that ``old`` is now ``new`` (``what``: e.g. "keyword argument of quantize")."""
    where = f" ({what})" if what else ""
    warnings.warn(f"{old!s} is deprecated{where}; use {new!s} (the old name is removed in hwnoise {REMOVED_IN})",
                  HwnoiseDeprecationWarning, stacklevel=stacklevel)


def renamed_kwargs(**old_to_new: str) -> Callable:
    """Accept each old keyword argument name for its new one, with a deprecation warning."""

    def decorate(func):
        params = inspect.signature(func).parameters
        for old, new in old_to_new.items():
            if new not in params:
                raise TypeError(f"renamed_kwargs: {func.__qualname__} has no parameter {new!r} (for {old!r})")
            if old in params:
                raise TypeError(f"renamed_kwargs: {func.__qualname__} still has the old parameter {old!r}")

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{func.__qualname__}() got both {old!r} (deprecated) and {new!r}; "
                                        f"give only {new!r}")
                    warn_renamed(f"{old}=", f"{new}=", what=f"keyword argument of {func.__qualname__}")
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        wrapper.__renamed_kwargs__ = dict(old_to_new)
        return wrapper

    return decorate


def module_aliases(module_name: str, aliases: Mapping[str, str], namespace: Mapping | None = None) -> Callable:
    """A module ``__getattr__``: ``old`` resolves to the module's ``aliases[old]``, with a warning.

    ``namespace`` is the module's ``globals()`` (looked up at access time, so the new names may be
    defined after the call). A target ``"package.module:attr"`` names an attribute of another
    module, imported only when the old name is used (a moved name: the old module does not import
    the new one's layer).
    """
    import importlib
    import sys

    def __getattr__(name: str):
        if name in aliases:
            new = aliases[name]
            if ":" in new:
                target_module, _, attr = new.partition(":")
                warn_renamed(f"{module_name}.{name}", f"{target_module}.{attr}")
                return getattr(importlib.import_module(target_module), attr)
            warn_renamed(f"{module_name}.{name}", f"{module_name}.{new}")
            ns = namespace if namespace is not None else vars(sys.modules[module_name])
            return ns[new]
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    __getattr__.__aliases__ = dict(aliases)
    return __getattr__
