"""The one static swap: a module's weight replaced by another tensor, or its input wrapped, for a block.

Every static hardware condition reaches a model through here: ``Emulation.applied`` (weights:FMT,
weights:plan.json without gradients), the scan (one module at a time, then all at once), the plan
search (every module in its planned format) and the verl rollout stream (each streamed weight
quantized as the Emulation says, ``quantized_weight``). ``set_weight`` is the only function in the
package that writes ``module._parameters[...]``; the straight-through path for gradients
(``hwnoise.inject.hooks``, a per-forward stand-in) goes through it too.

The original Parameter objects are put back on exit (also on errors): nothing is written to them,
so the clean weights come back bit for bit, optimizer state stays attached, and tied weights
(lm_head and the embedding) stay tied to the clean copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["quantized_input", "quantized_weight", "set_weight", "swapped_weight", "swapped_weights"]


def set_weight(module: nn.Module, weight, *, as_is: bool = False):
    """Put ``weight`` (a Parameter, a tensor wrapped as a frozen Parameter, or a non-leaf tensor
    for one forward) in ``module._parameters["weight"]``; returns what was there.

    Args:
        module: the module (it must have a ``weight`` entry in ``_parameters``).
        weight: the replacement. A plain tensor that needs no gradient is wrapped as a frozen
            ``nn.Parameter``; a tensor with a grad_fn (a straight-through stand-in) goes in as is.
        as_is: put ``weight`` in exactly as given (the straight-through hooks' per-forward stand-in).

    Example:
        >>> lin = nn.Linear(2, 2); old = set_weight(lin, torch.zeros(2, 2)); _ = set_weight(lin, old)
    """
    if "weight" not in module._parameters:
        raise ValueError(f"{type(module).__name__} has no weight parameter to swap")
    previous = module._parameters["weight"]
    if not as_is and isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter) \
            and weight.grad_fn is None:
        weight = nn.Parameter(weight, requires_grad=False)
    module._parameters["weight"] = weight
    return previous


@contextmanager
def swapped_weight(module: nn.Module, weight: torch.Tensor):
    """Run with ``module.weight`` replaced by ``weight``; the original Parameter is put back on exit.

    Args:
        module: the module whose weight is swapped.
        weight: the tensor it runs with inside the block (e.g. the weight's quantized copy).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> with swapped_weight(lin, torch.zeros(2, 2)):
        ...     assert float(lin.weight.abs().sum()) == 0
    """
    original = set_weight(module, weight)
    try:
        yield
    finally:
        set_weight(module, original)


@contextmanager
def swapped_weights(pairs: Iterable[tuple[nn.Module, torch.Tensor]]):
    """``swapped_weight`` for many modules at once; every original is put back on exit, last first.

    Args:
        pairs: (module, replacement weight) pairs, consumed lazily (a replacement may be computed
            while the earlier ones are already in place).

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> with swapped_weights([(a, torch.zeros(2, 2)), (b, torch.ones(2, 2))]):
        ...     pass
    """
    swapped: list[tuple[nn.Module, object]] = []
    try:
        for module, weight in pairs:
            swapped.append((module, set_weight(module, weight)))
        yield swapped
    finally:
        for module, original in reversed(swapped):
            set_weight(module, original)


@contextmanager
def quantized_input(modules: nn.Module | Mapping[str, nn.Module], quantizer: Callable):
    """Run with ``quantizer`` applied to the (first, floating-point) input of each module.

    Args:
        modules: one module, or name -> module.
        quantizer: ``quantizer(x)`` (one module) or ``quantizer(x, name)`` when ``modules`` is a
            mapping (e.g. stochastic rounding keyed by the module's name).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> with quantized_input(lin, lambda x: x.round()):
        ...     _ = lin(torch.randn(1, 2))
    """
    if isinstance(modules, nn.Module):
        items, named = [(None, modules)], False
    else:
        items, named = list(modules.items()), True

    def make(name):
        def hook(mod, args, kwargs):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                x = quantizer(args[0], name) if named else quantizer(args[0])
                return (x,) + tuple(args[1:]), kwargs
            for key in ("input", "hidden_states", "x"):  # called by keyword (as inject's input hook reads it)
                value = kwargs.get(key)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    x = quantizer(value, name) if named else quantizer(value)
                    return args, dict(kwargs, **{key: x})
            return None
        return hook

    handles = []
    try:
        for name, module in items:
            handles.append(module.register_forward_pre_hook(make(name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def quantized_weight(weight: torch.Tensor, fmt, **kwargs) -> torch.Tensor:
    """The quantized copy of one weight in a resolved format (a ``FormatSpec``): what every swap above
    puts in place, and what the verl stream sends to the engine.

    Args:
        weight: the clean weight (not written).
        fmt: a resolved ``FormatSpec`` (or a spec string, resolved here).
        kwargs: passed to ``hwnoise.quantize`` (e.g. ``seed`` for stochastic rounding).

    Example:
        >>> from hwnoise.formats import get
        >>> q = quantized_weight(torch.randn(4, 32), get("mxfp4"))
    """
    from ..formats import quantize

    with torch.no_grad():
        return quantize(weight.detach(), fmt, **kwargs)
