"""Bit-level storage: `encode` gives element codes and scale bytes, `decode` reads them back.

Codes are decoded through a lookup table built from the element's definition (sign, exponent
field, mantissa field), which is independent of the rounding code; `decode(encode(x))` equals
`quantize(x)` bit for bit, which cross-checks the two.
FP4 codes are packed two per byte, low nibble first. MX scales are E8M0 bytes (0xFF = NaN block).
NVFP4 scales are float8_e4m3fn block scales plus an fp32 tensor scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from . import kernels
from .blocks import BlockLayout, from_blocks, to_blocks
from .elements import ElementFormat, floor_log2, pow2
from .fake_quant import Options, _check_tensor, _finite_amax, _options, _uniform_like, fake_quantize
from .hif4 import decode_groups, encode_groups
from .registry import FormatSpec


@dataclass
class Encoded:
    """A tensor in storage form. `codes` are uint8 (int16 for bf16/fp16 casts)."""

    fmt: FormatSpec
    options: Options
    shape: tuple[int, ...]
    dtype: torch.dtype
    codes: torch.Tensor
    scales: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None
    layout: BlockLayout | None = None
    extra: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        total = self.codes.numel() * self.codes.element_size()
        for t in (self.scales, self.tensor_scale, *self.extra.values()):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total


@lru_cache(maxsize=None)
def decode_table(elem: ElementFormat) -> torch.Tensor:
    """fp32 value of every code of `elem`, from the format's definition."""
    n = 1 << elem.bits
    values = []
    for code in range(n):
        if elem.kind == "int":  # two's complement, implicit 2^-fraction_bits
            k = code - n if code >= n // 2 else code
            k = max(k, -round(elem.max_normal * 2**elem.fraction_bits))  # symmetric: -128 reads as -127
            values.append(k * 2.0**-elem.fraction_bits)
            continue
        sign = -1.0 if code >> (elem.ebits + elem.mbits) else 1.0
        exp_field = (code >> elem.mbits) & ((1 << elem.ebits) - 1)
        mant = code & ((1 << elem.mbits) - 1)
        if exp_field == 0:
            mag = mant * 2.0 ** (elem.emin - elem.mbits)
        else:
            mag = 2.0 ** (exp_field - elem.bias) * (1 + mant / 2**elem.mbits)
        if mag > elem.max_normal:  # e4m3fn's S.1111.111, e5m2's inf/nan codes
            mag = float("nan") if elem.name == "e4m3" or mant else float("inf")
        values.append(sign * mag)
    return torch.tensor(values, dtype=torch.float32)


def element_codes(q: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Codes (uint8) of values already on `elem`'s grid."""
    if elem.name == "e4m3":
        return q.to(torch.float8_e4m3fn).view(torch.uint8)
    if elem.name == "e5m2":
        return q.to(torch.float8_e5m2).view(torch.uint8)
    if elem.kind == "int":
        k = torch.round(torch.nan_to_num(q) * 2.0**elem.fraction_bits).to(torch.int32)
        return (k & 0xFF).to(torch.uint8)
    a = torch.nan_to_num(q.abs())
    sub = a < elem.min_normal
    e = floor_log2(a).clamp(min=elem.emin)
    exp_field = torch.where(sub, torch.zeros_like(e), e - elem.emin + 1)
    mant = torch.where(sub, a * pow2(torch.full_like(e, elem.mbits - elem.emin)), (a * pow2(-e) - 1) * 2**elem.mbits)
    sign = (torch.signbit(q)).to(torch.int32) << (elem.ebits + elem.mbits)
    return (sign | (exp_field << elem.mbits) | mant.to(torch.int32)).to(torch.uint8)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def _lookup(codes: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    return decode_table(elem).to(codes.device)[codes.long()]


def encode(x: torch.Tensor, format, *, scale_mode=None, rounding=None, block=None, axis=None, seed=None,  # noqa: A002
           flavor=None) -> Encoded:
    """Quantize `x` to `format` into storage form (see the module docstring for the layout)."""
    _check_tensor(x)
    o = _options(x, format, scale_mode, rounding, block, axis, flavor)
    f = o.fmt
    uniform = _uniform_like(x, seed) if o.rounding == "stochastic" else None
    x32 = x.detach().to(torch.float32)
    enc = Encoded(f, o, tuple(x.shape), x.dtype, codes=torch.empty(0, dtype=torch.uint8))
    if f.family == "cast":
        target = torch.bfloat16 if f.element.name == "bf16" else torch.float16
        enc.codes = fake_quantize(x32, o, uniform).to(target).view(torch.int16)
        return enc
    if f.family == "per_tensor":
        q, scale = kernels.per_tensor_blocks(x32, _finite_amax(x32), f.element, o.rounding, uniform, want_codes=True)
        enc.codes, enc.tensor_scale = element_codes(q, f.element), scale
        return enc
    xb, enc.layout = to_blocks(x32, o.block, o.axes)
    ub = to_blocks(uniform, o.block, o.axes)[0] if uniform is not None else None
    if f.family == "hif4":
        enc.extra = encode_groups(xb, o.rounding, ub)
        return enc
    if f.family == "mx":
        q, s, nonfinite = kernels.mx_blocks(xb, f.element, o.scale_mode, o.rounding, ub, o.flavor, want_codes=True)
        biased = (s + kernels.E8M0_BIAS).to(torch.int32)
        enc.scales = torch.where(nonfinite, kernels.E8M0_NAN, biased).to(torch.uint8).squeeze(-1)
    else:  # nvfp4
        q, block_scale, tensor_scale, nonfinite = kernels.nvfp4_blocks(
            xb, _finite_amax(x32), f.element, o.rounding, ub, o.flavor, want_codes=True)
        block_scale = torch.where(nonfinite, float("nan"), block_scale)
        enc.scales = block_scale.squeeze(-1).to(torch.float8_e4m3fn)
        enc.tensor_scale = tensor_scale
    codes = element_codes(q, f.element)
    enc.codes = _pack_nibbles(codes) if f.element.bits == 4 else codes
    return enc


def decode(enc: Encoded) -> torch.Tensor:
    """Values of an `Encoded` tensor, in its original shape and dtype."""
    f, o = enc.fmt, enc.options
    if f.family == "cast":
        target = torch.bfloat16 if f.element.name == "bf16" else torch.float16
        return enc.codes.view(target).to(enc.dtype)
    if f.family == "per_tensor":
        return kernels.per_tensor_decode(_lookup(enc.codes, f.element), enc.tensor_scale).to(enc.dtype)
    if f.family == "hif4":
        return from_blocks(decode_groups(enc.extra), enc.layout).to(enc.dtype)
    codes = _unpack_nibbles(enc.codes) if f.element.bits == 4 else enc.codes
    q = _lookup(codes, f.element)
    if f.family == "mx":
        s = enc.scales.to(torch.int32).unsqueeze(-1) - kernels.E8M0_BIAS
        out = q * pow2(s.clamp(max=kernels.E8M0_MAX_EXP))
        out = torch.where(enc.scales.unsqueeze(-1) == kernels.E8M0_NAN, float("nan"), out)
    else:
        block_scale = enc.scales.to(torch.float32).unsqueeze(-1)
        out = kernels.nvfp4_decode(q, block_scale, enc.tensor_scale, torch.isnan(block_scale), o.flavor)
    return from_blocks(out, enc.layout).to(enc.dtype)
