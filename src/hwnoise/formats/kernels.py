"""Block quantizers: pure functions from fp32 blocks [N, B] to dequantized fp32 blocks.

Each follows its reference's order of operations, with a comment where the order changes the bits.
They are written with plain tensor ops so that the same function runs eagerly (the reference) and
under torch.compile (the fast path); tests hold the two equal bit for bit.
"""

from __future__ import annotations

import torch

# Casts are written as grid rounding from the bits, never as x.to(low).to(fp32): inductor may fold
# such a round trip into a no-op, and the compiled path must equal the eager one bit for bit.
from .elements import ELEMENTS, F32_MAX, ElementFormat, ceil_log2, round_to_element, round_to_element_fast

E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
E8M0_NAN = 0xFF
F32_MIN_NORMAL = 2.0**-126
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6  # torch.finfo(torch.float8_e4m3fn).tiny
E2M1_MAX = 6.0
NVFP4_TENSOR_SCALE_NUMERATOR = E4M3_MAX * E2M1_MAX  # 2688: a block at the tensor amax gets scale 448

SCALE_MODES = ("floor", "ceil", "even", "rceil")


def _raw_exponent(a: torch.Tensor) -> torch.Tensor:
    """The unbiased fp32 exponent field: floor(log2(a)) for normals, -127 for zero and subnormals.
    Enough for floor/even scales: any amax below 2^-126 clamps to the smallest scale anyway."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - E8M0_BIAS


def e8m0_pow2(s: torch.Tensor) -> torch.Tensor:
    """2^s for s in [-127, 127] as fp32 (2^-127 is the one subnormal), from the bits."""
    s = s.to(torch.int32)
    normal = ((s + E8M0_BIAS).clamp(min=1) << 23).view(torch.float32)
    return torch.where(s == E8M0_MIN_EXP, torch.full_like(normal, 2.0**-127), normal)


def mx_scale_exponent(amax: torch.Tensor, elem: ElementFormat, scale_mode: str) -> torch.Tensor:
    """Shared E8M0 scale exponent of each block, clamped to [-127, 127], from the fp32 bits."""
    if scale_mode == "floor":
        s = _raw_exponent(amax) - elem.emax
    elif scale_mode == "ceil":
        s = ceil_log2(amax) - elem.emax
    elif scale_mode == "even":
        # Round amax half-up to the element's mantissa width; a carry bumps the exponent.
        mbits = elem.mbits if elem.kind == "float" else elem.mbits - 1
        bits = amax.view(torch.int32) + (1 << (23 - mbits - 1))
        rounded = (bits & 0x7F800000).view(torch.float32)
        s = _raw_exponent(torch.where(amax < F32_MIN_NORMAL, amax, rounded)) - elem.emax
    elif scale_mode == "rceil":
        # cuBLAS / Transformer Engine: the fp32 quotient rounded up to a power of two (cvt.rp to ue8m0).
        s = ceil_log2(amax / elem.max_normal)
    else:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; known: {', '.join(SCALE_MODES)}")
    return s.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def mx_block_scales(xb: torch.Tensor, elem: ElementFormat, scale_mode: str, flavor: str = "ocp"):
    """Per block: (multiplier that scales the block onto the element grid, E8M0 exponent s,
    nonfinite mask), each [N, 1].

    flavor "ocp": the OCP MX v1.0 semantics (a block holding NaN or Inf is NaN; the scale 2^-127 is
    used as is). flavor "torchao": torchao 0.18's emulation, which divides by max(2^s, 2^-126) in
    floor/ceil/even, multiplies by 1.0 instead of 2^127 when rceil gives s = -127, and lets Inf
    saturate instead of poisoning the block. Every multiplier is a power of two, so multiplying by
    it equals torchao's division bit for bit.
    """
    amax = xb.abs().amax(dim=-1, keepdim=True)
    s = mx_scale_exponent(amax, elem, scale_mode)
    if flavor == "torchao":
        if scale_mode == "rceil":
            inv = torch.where(s == E8M0_MIN_EXP, torch.ones_like(amax), e8m0_pow2(-s))
        else:
            inv = e8m0_pow2(-s.clamp(min=E8M0_MIN_EXP + 1))  # 1 / max(2^s, 2^-126)
        return inv, s, torch.isnan(amax)
    return e8m0_pow2(-s), s, ~torch.isfinite(amax)


def mx_apply_scales(xb, inv, s, nonfinite, elem: ElementFormat, rounding: str, uniform):
    """Round the scaled blocks onto the element grid and scale back (dequantized blocks)."""
    q = round_to_element_fast(xb * inv, elem, rounding, uniform)
    out = q * e8m0_pow2(s)  # exact: few significant bits times a power of two
    return torch.where(nonfinite, torch.full_like(out, float("nan")), out)


def mx_blocks(
    xb: torch.Tensor,
    elem: ElementFormat,
    scale_mode: str,
    rounding: str,
    uniform: torch.Tensor | None,
    flavor: str = "ocp",
    want_codes: bool = False,
):
    """MX fake-quant of blocks [N, B] (see `mx_block_scales` for the flavors). Returns dequantized
    blocks, or (element values, E8M0 exponents, nonfinite-block mask) with `want_codes`."""
    inv, s, nonfinite = mx_block_scales(xb, elem, scale_mode, flavor)
    if want_codes:
        return round_to_element_fast(xb * inv, elem, rounding, uniform), s, nonfinite
    return mx_apply_scales(xb, inv, s, nonfinite, elem, rounding, uniform)


def block_amaxes(xb: torch.Tensor):
    """Per block [N, 1]: amax (NaN if the block holds NaN) and the amax of its finite values. The
    max of the latter over blocks is the tensor's finite amax."""
    a = xb.abs()
    finite = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    return a.amax(dim=-1, keepdim=True), finite.amax(dim=-1, keepdim=True)


def nvfp4_block_scales(amax: torch.Tensor, tensor_amax: torch.Tensor, flavor: str = "nvidia"):
    """From block amaxes [N, 1] and the tensor's finite amax (0-d): (encode multiplier, E4M3 block
    scale, fp32 tensor scale, nonfinite mask).

    flavor "nvidia" mirrors Transformer Engine's reference quantizer (custom_recipes, 1x16 and 16x16
    tiles): S_enc = 2688 / amax_tensor, s_b = e4m3(amax_b * (S_enc * (1/6))), encode with
    1 / (s_b * (1 / S_enc)), decode as (q * s_b) * (1 / S_enc). Block scales may be subnormal or 0.
    flavor "torchao" mirrors torchao 0.18's two-level `nvfp4_quantize`: tensor scale
    t = amax_tensor / 2688, s_b = e4m3(clamp(amax_b / 6 / t, 2^-6, 448)), encode with (1/t) / s_b,
    decode as q * (t * s_b).
    """
    usable = (tensor_amax > 0) & torch.isfinite(tensor_amax)
    if flavor == "nvidia":
        # A tensor-by-tensor division rounds once; `float / tensor` is float * reciprocal(tensor) in
        # PyTorch and rounds twice (1 ulp off Transformer Engine's S_enc).
        numerator = torch.full_like(tensor_amax, NVFP4_TENSOR_SCALE_NUMERATOR)
        s_enc = torch.where(usable, numerator / tensor_amax, torch.ones_like(tensor_amax))
        s_enc = torch.clamp(s_enc, max=F32_MAX)
        s_dec = 1.0 / s_enc
        # TE folds 1/6 into the tensor scale first; multiplying in this order changes the bits.
        multiplier = s_enc * torch.reciprocal(torch.full_like(s_enc, E2M1_MAX))
        block_scale = torch.clamp(torch.clamp(amax * multiplier, max=F32_MAX), max=E4M3_MAX)
        block_scale = round_to_element(block_scale, ELEMENTS["e4m3"], "rne")  # e4m3 RNE, subnormals kept
        encode = torch.clamp(1.0 / (block_scale * s_dec), max=F32_MAX)
        return encode, block_scale, s_dec, ~torch.isfinite(amax)
    if flavor == "torchao":
        t = torch.where(usable, tensor_amax / NVFP4_TENSOR_SCALE_NUMERATOR, torch.ones_like(tensor_amax))
        # torchao divides by 6 first, then by the tensor scale; the order changes the bits.
        block_scale = torch.clamp((amax / E2M1_MAX) / t, min=E4M3_MIN_NORMAL, max=E4M3_MAX)
        block_scale = round_to_element(block_scale, ELEMENTS["e4m3"], "rne")
        return (1.0 / t) / block_scale, block_scale, t, torch.isnan(amax)
    raise ValueError(f"unknown nvfp4 flavor {flavor!r}; known: nvidia, torchao")


def nvfp4_apply_scales(xb, encode, block_scale, tensor_scale, nonfinite, elem: ElementFormat, rounding: str,
                       uniform, flavor: str = "nvidia", want_codes: bool = False):
    v = torch.clamp(xb * encode, -E2M1_MAX, E2M1_MAX)
    if flavor == "torchao":
        # A subnormal tensor scale makes 1/t inf and 0 * inf NaN, which torchao turns into garbage
        # codes; zero stays zero here, with its sign (torchao keeps -0.0).
        v = torch.where(xb == 0, xb, v)
    q = round_to_element_fast(v, elem, rounding, uniform)
    if flavor == "nvidia":
        # TE's cast_to_fp4x2 picks the negative codes for scaled values < 0 only: -0.0 (and a product
        # that underflows to -0.0) becomes +0, negatives that round to zero stay -0.0.
        q = torch.where(v == 0, torch.zeros_like(q), q)
    if want_codes:
        return q
    return nvfp4_decode(q, block_scale, tensor_scale, nonfinite, flavor)


def nvfp4_blocks(
    xb: torch.Tensor,
    tensor_amax: torch.Tensor,
    elem: ElementFormat,
    rounding: str,
    uniform: torch.Tensor | None,
    flavor: str = "nvidia",
    want_codes: bool = False,
):
    """NVFP4 fake-quant of blocks [N, 16] (see `nvfp4_block_scales` for the flavors).
    `tensor_amax` is the amax over the finite values of the whole tensor (0-d fp32)."""
    amax = xb.abs().amax(dim=-1, keepdim=True)
    encode, block_scale, tensor_scale, nonfinite = nvfp4_block_scales(amax, tensor_amax, flavor)
    q = nvfp4_apply_scales(xb, encode, block_scale, tensor_scale, nonfinite, elem, rounding, uniform, flavor,
                           want_codes)
    if want_codes:
        return q, block_scale, tensor_scale, nonfinite
    return q


def nvfp4_decode(q, block_scale, tensor_scale, nonfinite, flavor):
    out = (q * block_scale) * tensor_scale if flavor == "nvidia" else q * (tensor_scale * block_scale)
    # A tensor amax near fp32's max can round the product just past it: the value is finite.
    out = torch.clamp(out, -F32_MAX, F32_MAX)
    return torch.where(nonfinite, torch.full_like(out, float("nan")), out)


def per_tensor_blocks(
    x: torch.Tensor, tensor_amax: torch.Tensor, elem: ElementFormat, rounding: str, uniform,
    want_codes: bool = False,
):
    """Per-tensor scaled FP8 (torchao.float8 convention): scale = max_elem / amax, x_q = q / scale.
    Non-finite inputs become NaN."""
    usable = (tensor_amax > 0) & torch.isfinite(tensor_amax)
    # Tensor division (one rounding, as torchao.float8); capped so a tiny amax cannot make it inf.
    scale = torch.full_like(tensor_amax, elem.max_normal) / tensor_amax
    scale = torch.where(usable, torch.clamp(scale, max=F32_MAX), torch.ones_like(tensor_amax))
    q = round_to_element_fast(x * scale, elem, rounding, uniform)
    q = torch.where(torch.isfinite(x), q, torch.full_like(q, float("nan")))
    if want_codes:
        return q, scale
    return per_tensor_decode(q, scale)


def per_tensor_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(q / scale, -F32_MAX, F32_MAX)  # clamp keeps NaN
