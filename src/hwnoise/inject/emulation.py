"""Moved: ``hwnoise.inject.emulation`` is now ``hwnoise.emulation`` (removed in hwnoise 0.3).

Only a module ``__getattr__``: every name resolves in ``hwnoise.emulation`` with a deprecation
warning; importing this module does not import the emulation layer.
"""

from ..compat import warn_renamed as _warn_renamed


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    new = importlib.import_module("hwnoise.emulation")
    if not hasattr(new, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} "
                             f"(it moved to hwnoise.emulation, which has none either)")
    _warn_renamed(f"{__name__}.{name}", f"hwnoise.emulation.{name}", stacklevel=3)
    return getattr(new, name)
