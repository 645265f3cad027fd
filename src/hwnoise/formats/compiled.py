"""One torch.compile'd function per key (an option set and a stage), for the format kernels and the
scan's statistics, with an eager fallback for compiler failures only.

The eager function is the reference and the compiled one must equal it bit for bit (the tests hold
them equal). A compiler that cannot build a graph (no C++ toolchain, an unsupported op) leaves that
one key eager with a RuntimeWarning; any other error is the caller's and propagates. Set
HWNOISE_COMPILE=0 to stay eager everywhere.
"""

from __future__ import annotations

import itertools
import os
import types
import warnings
from collections.abc import Callable, Hashable

import torch
import torch._dynamo.exc
import torch._inductor.exc

COMPILE_MIN_NUMEL = 1 << 16  # below this, eager is as fast as a compiled call
_DISABLED = ("0", "false", "no", "off")

# What a compiler raises when it cannot build or run a graph: dynamo's errors (BackendCompilerFailed,
# Unsupported, InductorError, ...) and inductor's own that are not wrapped in them.
COMPILER_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.TorchDynamoException,
    torch._inductor.exc.OperatorIssue,
    torch._inductor.exc.InvalidCxxCompiler,
    torch._inductor.exc.CppCompileError,
    torch._inductor.exc.CppWrapperCodegenError,
    torch._inductor.exc.SubgraphLoweringException,
)

_tags = itertools.count()


def compile_enabled() -> bool:
    """False under HWNOISE_COMPILE=0, and inside a graph being compiled (the caller's compile
    traces the eager body instead)."""
    return os.environ.get("HWNOISE_COMPILE", "1").strip().lower() not in _DISABLED and \
        not torch.compiler.is_compiling()


def worth_compiling(x: torch.Tensor) -> bool:
    return x.numel() >= COMPILE_MIN_NUMEL and compile_enabled()


def own_code(fn: Callable, tag: int) -> Callable:
    """A copy of `fn` with a code object of its own. Dynamo keys its cache, its recompile limit
    and its shape tracking by code object: sharing one across option sets made every call walk
    the guards of all the others (5x slower with five formats in use) and hit the limit at 8."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class CompileCache:
    """Compiled functions by key. `run(key, body, *args)` compiles `body` the first time it meets
    `key` (fullgraph: a graph break is an error, not a silent split) and calls the compiled one."""

    def __init__(self, name: str, dynamic: bool | None = None):
        self.name = name
        self.dynamic = dynamic  # None: a second shape recompiles once with symbolic sizes
        self._compiled: dict[Hashable, Callable] = {}
        self.eager_keys: set[Hashable] = set()  # keys whose compilation failed: they run eager

    def keys(self) -> list[Hashable]:
        return list(self._compiled)

    def clear(self) -> None:
        self._compiled.clear()
        self.eager_keys.clear()

    def run(self, key: Hashable, body: Callable, *args):
        if key in self.eager_keys:
            return body(*args)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = torch.compile(own_code(body, next(_tags)), dynamic=self.dynamic,
                                                     fullgraph=True)
        try:
            return fn(*args)
        except COMPILER_ERRORS as exc:
            self.eager_keys.add(key)
            del self._compiled[key]
            warnings.warn(f"hwnoise: torch.compile failed for {self.name} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); this option set runs eager",
                          RuntimeWarning, stacklevel=2)
            return body(*args)
