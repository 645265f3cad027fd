"""`quantize`: fake quantization with a straight-through gradient, eager or compiled.

The eager path is the reference. Large tensors go through the same functions compiled by
torch.compile (fused into a few passes over memory); tests hold the two equal bit for bit. Set
HWNOISE_COMPILE=0 to stay eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .blocks import from_blocks, normalize_axes, to_blocks
from .compiled import CompileCache, worth_compiling
from .elements import round_to_element
from .hif4 import quantize_groups
from .registry import FormatSpec, get

ACCEPTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STE_MODES = ("identity", "clipped")


@dataclass(frozen=True)
class Options:
    """Resolved options for one quantize call (hashable: keys the compile cache)."""

    fmt: FormatSpec
    scale_mode: str | None
    rounding: str
    block: tuple[int, ...] | None
    axes: tuple[int, ...] | None
    flavor: str | None


def _check_tensor(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"quantize expects a float32, bfloat16 or float16 tensor, got {x.dtype}")


def options_for(x: torch.Tensor, format, *, scale_mode=None, rounding=None, block=None, axis=None,  # noqa: A002
                flavor=None) -> Options:
    """The resolved, validated options that `quantize(x, format, ...)` would use (hashable).

    A FormatSpec with its options already applied (``get(spec)``, ``spec.with_options(...)``) is
    used as it is: resolve a format once, then call this (or `quantize`) per tensor without going
    back to the registry."""
    return _options(x, format, scale_mode, rounding, block, axis, flavor)


def _options(x, fmt, scale_mode, rounding, block, axis, flavor) -> Options:
    if not isinstance(fmt, FormatSpec):
        fmt = get(fmt)
    if any(v is not None for v in (scale_mode, rounding, block, flavor)):
        fmt = fmt.with_options(scale_mode=scale_mode, rounding=rounding, block=block, flavor=flavor)
    axes = None
    if fmt.block is not None:
        axes = normalize_axes(axis, x.ndim, len(fmt.block))
    elif axis not in (None, -1):
        raise ValueError(f"{fmt.name} has no blocks, so axis={axis!r} means nothing; leave it out")
    return Options(fmt, fmt.scale_mode, fmt.rounding, fmt.block, axes, fmt.flavor)


def _finite_amax(x32: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x32), x32.abs(), torch.zeros_like(x32)).amax() if x32.numel() else \
        torch.zeros((), dtype=torch.float32, device=x32.device)


def _uniform_like(x: torch.Tensor, seed: int | None) -> torch.Tensor:
    """U[0,1) draws, one per element of x: keyed by the seed (or the global generator if None)."""
    if seed is None:
        return torch.rand(x.shape, dtype=torch.float32, device=x.device)
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed))
    return torch.rand(x.shape, dtype=torch.float32, device=x.device, generator=g)


def fake_quantize(x: torch.Tensor, o: Options, uniform: torch.Tensor | None) -> torch.Tensor:
    """The whole round trip for one resolved option set, as plain tensor ops (compilable)."""
    fmt = o.fmt
    x32 = x.to(torch.float32)
    if fmt.family == "cast":
        # Grid rounding from the bits, not x.to(bf16).to(fp32): inductor folds that round trip
        # into a no-op unless it emulates precision casts. Equal to the IEEE cast for rne.
        return round_to_element(x32, fmt.element, o.rounding, uniform).to(x.dtype)
    if fmt.family == "per_tensor":
        return kernels.per_tensor_blocks(x32, _finite_amax(x32), fmt.element, o.rounding, uniform).to(x.dtype)
    xb, layout = to_blocks(x32, o.block, o.axes)
    ub = to_blocks(uniform, o.block, o.axes)[0] if uniform is not None else None
    if fmt.family == "mx":
        yb = kernels.mx_blocks(xb, fmt.element, o.scale_mode, o.rounding, ub, o.flavor)
    elif fmt.family == "nvfp4":
        yb = kernels.nvfp4_blocks(xb, _finite_amax(x32), fmt.element, o.rounding, ub, o.flavor)
    elif fmt.family == "hif4":
        yb = quantize_groups(xb, o.rounding, ub)
    else:  # pragma: no cover - the registry only holds known families
        raise AssertionError(fmt.family)
    return from_blocks(yb, layout).to(x.dtype)


def saturation_mask(x: torch.Tensor, o: Options) -> torch.Tensor:
    """Where |x| lies beyond the largest magnitude its block (or tensor) can represent."""
    fmt = o.fmt
    x32 = x.to(torch.float32)
    if fmt.family == "cast":
        return x32.abs() > fmt.element.max_normal
    if fmt.family == "per_tensor":
        return torch.zeros_like(x32, dtype=torch.bool)  # the scale maps the amax onto the maximum
    xb, layout = to_blocks(x32, o.block, o.axes)
    if fmt.family == "mx":
        _, s, _ = kernels.mx_blocks(xb, fmt.element, o.scale_mode, "toward_zero", None, o.flavor, want_codes=True)
        limit = fmt.element.max_normal * kernels.e8m0_pow2(s)
    elif fmt.family == "nvfp4":
        _, sb, ts, _ = kernels.nvfp4_blocks(xb, _finite_amax(x32), fmt.element, "toward_zero", None, o.flavor,
                                            want_codes=True)
        limit = kernels.E2M1_MAX * sb * ts if o.flavor == "nvidia" else kernels.E2M1_MAX * ts * sb
    else:
        # HiF4: no single block maximum; use the largest magnitude the group produced.
        limit = quantize_groups(xb, "rne", None).abs().amax(dim=-1, keepdim=True)
    return from_blocks(xb.abs() > limit, layout)


def _into(out: torch.Tensor, t: torch.Tensor, o: Options, u) -> torch.Tensor:
    return out.copy_(fake_quantize(t, o, u))


_BODIES = {
    "quantize": lambda o: (lambda t, u: fake_quantize(t, o, u)),
    "quantize_into": lambda o: (lambda t, u, dst: _into(dst, t, o, u)),
    "saturation": lambda o: (lambda t: saturation_mask(t, o)),
    # MX in two compiled stages: fused into one, inductor recomputes the block scale for every
    # element; materializing the [N, 1] scales first is ~30 % faster, bit for bit the same.
    "mx_scales": lambda o: (lambda xb: kernels.mx_block_scales(xb, o.fmt.element, o.scale_mode, o.flavor)),
    "mx_apply": lambda o: (lambda xb, inv, s, nf, ub: kernels.mx_apply_scales(
        xb, inv, s, nf, o.fmt.element, o.rounding, ub)),
    "mx_apply_into": lambda o: (lambda xb, inv, s, nf, ub, dst: dst.copy_(kernels.mx_apply_scales(
        xb, inv, s, nf, o.fmt.element, o.rounding, ub))),
    # NVFP4 likewise: block amaxes (one read), then [N, 1] scales, then one pass that applies them.
    "block_amaxes": lambda o: kernels.block_amaxes,
    "nvfp4_scales": lambda o: (lambda amax, tensor_amax: kernels.nvfp4_block_scales(amax, tensor_amax, o.flavor)),
    "nvfp4_apply": lambda o: (lambda xb, enc, bs, ts, nf, ub: kernels.nvfp4_apply_scales(
        xb, enc, bs, ts, nf, o.fmt.element, o.rounding, ub, o.flavor)),
    "nvfp4_apply_into": lambda o: (lambda xb, enc, bs, ts, nf, ub, dst: dst.copy_(kernels.nvfp4_apply_scales(
        xb, enc, bs, ts, nf, o.fmt.element, o.rounding, ub, o.flavor))),
}


_CACHE = CompileCache("quantize")


def _call(kind: str, o: Options, x: torch.Tensor, *args):
    """Run `kind` for option set `o`: compiled for large tensors, eager otherwise."""
    body = _BODIES[kind](o)
    return _CACHE.run((o, kind), body, x, *args) if worth_compiling(x) else body(x, *args)


def _run(x: torch.Tensor, o: Options, uniform, out: torch.Tensor | None = None) -> torch.Tensor:
    if o.fmt.family in ("mx", "nvfp4") and worth_compiling(x):
        return _run_staged(x, o, uniform, out)
    return _call("quantize", o, x, uniform) if out is None else _call("quantize_into", o, x, uniform, out)


def _run_staged(x, o: Options, uniform, out):
    """MX and NVFP4 as separately compiled stages: block scales first ([N, 1] tensors, one read
    of x), then one pass that applies them."""
    xb, layout = to_blocks(x.to(torch.float32), o.block, o.axes)
    ub = to_blocks(uniform, o.block, o.axes)[0] if uniform is not None else None
    if o.fmt.family == "mx":
        scales = _call("mx_scales", o, xb)
        apply = "mx_apply"
    else:
        amax, finite_amax = _call("block_amaxes", o, xb)
        scales = _call("nvfp4_scales", o, amax, finite_amax.amax())
        apply = "nvfp4_apply"
    # Write straight into `out` when it is the blocks' own memory (fp32, contiguous, last axis, no padding).
    direct = (out is not None and out.dtype == torch.float32 and out.is_contiguous() and len(o.axes) == 1
              and o.axes[0] == x.ndim - 1 and x.shape[-1] % o.block[0] == 0)
    if direct:
        _call(apply + "_into", o, xb, *scales, ub, out.view(xb.shape))
        return out
    y = from_blocks(_call(apply, o, xb, *scales, ub), layout).to(x.dtype)
    return y if out is None else out.copy_(y)


def saturated(x: torch.Tensor, o: Options) -> torch.Tensor:
    """`saturation_mask`, compiled for large tensors."""
    return _call("saturation", o, x.detach())


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, o, uniform, clipped):
        y = _run(x.detach(), o, uniform)
        ctx.clipped = clipped
        if clipped:
            ctx.save_for_backward(saturated(x, o))
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.clipped:
            (saturated,) = ctx.saved_tensors
            grad = grad.masked_fill(saturated, 0)
        return grad, None, None, None


def quantize(
    x: torch.Tensor,
    format="mxfp4",  # noqa: A002 - the one name for a number format in the public API
    *,
    scale_mode: str | None = None,
    rounding: str | None = None,
    block=None,
    axis=None,
    seed: int | None = None,
    flavor: str | None = None,
    ste: str = "identity",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize `x` to `format`: same shape, dtype and device, values on the format's grid.

    format: a registered name or spec string (see `hwnoise.formats.names()`), or a FormatSpec.
    scale_mode: MX scale rule, "floor" (OCP default), "ceil", "even" or "rceil".
    rounding: "rne", "half_away", "toward_zero" or "stochastic" (default: the format's own).
    block: block size, or a 2-D tile such as (32, 32). axis: the block axis (a pair for tiles;
    default the last axis, or the last two). seed: keys stochastic rounding (None: global RNG).
    flavor: "ocp"/"torchao" for MX, "nvidia"/"torchao" for NVFP4. ste: the gradient, "identity"
    (straight through) or "clipped" (zero where the value saturated). out: write the result into
    this preallocated tensor (same shape, dtype and device; not for tensors that need gradients).
    """
    _check_tensor(x)
    if ste not in STE_MODES:
        raise ValueError(f"unknown ste {ste!r}; known: {', '.join(STE_MODES)}")
    o = _options(x, format, scale_mode, rounding, block, axis, flavor)
    uniform = _uniform_like(x, seed) if o.rounding == "stochastic" else None
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            got = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}); got {got}")
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError("out= cannot be used when x requires grad; call quantize(x) instead")
    if x.numel() == 0:
        return x.clone() if out is None else out
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, o, uniform, ste == "clipped")
    return _run(x, o, uniform, out)
