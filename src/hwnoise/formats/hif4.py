"""HiF4 (Huawei HiFloat4, arXiv 2602.11287): 64-element groups with a three-level scale.

Definition (sources and the choices made where they are silent: /tmp/research/hif4.md), taken from
the published golden model (ddddwee1/HiFloat4, hifx4_npu/HiF4_NVFP4_v14f16.py, `To_HiFX`) and its
Ascend kernel (hifx4_npu/quant_cy_npu/base/cusrc/hifx_quant_op.h), which its README says agree exactly:

* A group is 64 consecutive elements = 8 level-2 sub-groups of 8 = 16 level-3 sub-groups of 4.
* Level 1: one E6M2 scale S per group (unsigned, exponent bias 48, no subnormals, no zero):
  2^(E-48) * (1 + M/4), from 2^-48 to 49152 = 2^15 * 1.5; the code 0xFF (2^15 * 1.75) is NaN.
* Level 2: one bit per 8 elements, level 3: one bit per 4 elements; each bit doubles the scale,
  so a sub-group of 4 sees S * 2^(l2 + l3), l2 + l3 in {0, 1, 2}.
* Element: sign + 3-bit magnitude q with value q/4, i.e. {0, 0.25, ..., 1.75} ("S1P2": one
  integer bit, two fraction bits; equal to S1E1M2 with bias 1). Largest value S * 4 * 1.75 = 7 S.

Conversion (all arithmetic in fp32, as the kernel does):
  S   = E6M2_rne(clamp(bf16_rne(amax * bf16(1/7)), 2^-48, 49152))
  r   = bf16(1/S)                     (the hardware reciprocal, RCPE6M2; a table here)
  p   = |x| * r                       (the only inexact product: fp32 rounding)
  l2  = max(p over 8) >= 4;  l3 = max(p over 4) / 2^l2 >= 2
  q   = min(round(p * 2^(2 - l2 - l3)), 7),  value = sign * q/4 * 2^(l2 + l3) * S
The reciprocal is not exactly 1/S (except for power-of-two S), so the conversion is not
idempotent for every group; see the notes.
"""

from __future__ import annotations

import torch

from .elements import round_stochastic

GROUP_SIZE = 64
L2_SIZE = 8  # elements sharing one level-2 exponent bit
L3_SIZE = 4  # elements sharing one level-3 exponent bit
N_L2 = GROUP_SIZE // L2_SIZE  # 8 level-2 bits per group
N_L3 = GROUP_SIZE // L3_SIZE  # 16 level-3 bits per group

ELEMENT_BITS = 4  # sign + 3 magnitude bits
ELEMENT_FRAC_BITS = 2  # magnitude = q * 2^-2
ELEMENT_MAX_CODE = 7  # q in 0..7
ELEMENT_MAX = ELEMENT_MAX_CODE / 2**ELEMENT_FRAC_BITS  # 1.75
ELEMENT_SIGN_BIT = 3  # element code = sign << 3 | q (the golden model's SE1M2 nibble)

SCALE_BITS = 8  # E6M2
BITS_PER_VALUE = (GROUP_SIZE * ELEMENT_BITS + SCALE_BITS + N_L2 + N_L3) / GROUP_SIZE  # 4.5

E6M2_MAN_BITS = 2
E6M2_BIAS = 48
E6M2_MIN = 2.0**-48  # code 0x00; there is no zero scale
E6M2_MAX = 2.0**15 * 1.5  # 49152, code 0xFE
E6M2_NAN = 0xFF  # 2^15 * 1.75 is reserved for NaN

# A level bit doubles a sub-group's step once its scaled max p reaches 2 per doubling below it:
# level 3 at p / 2^l2 >= 2 (the element grid tops out at 1.75), level 2 at p >= 4 over 8 elements.
# The tests use the unrounded p, so a max in [1.875, 2) on the finer grid saturates at 1.75.
L2_THRESHOLD = 4.0
L3_THRESHOLD = 2.0
MAX_SUBGROUP_SHIFT = 2  # l2 + l3 at most
# Level 1 aims the group amax at the largest multiple of S: 2^2 * 1.75 = 7, i.e. S ~ amax / 7.
GROUP_MAX_MULTIPLE = 2**MAX_SUBGROUP_SHIFT * ELEMENT_MAX
INV_GROUP_MAX_BF16 = 0.142578125  # bf16_rne(1/7) = 73/512: the hardware multiplies, never divides
# bf16_rne(1 / (1 + M/4)) for M = 0..3: the E6M2 reciprocal instruction's mantissa table
# (golden model E6M2_REC: 1 + {0, 77, 43, 18}/128 at one binade lower for M > 0).
RCP_E6M2_MANTISSA = (1.0, 0.80078125, 0.66796875, 0.5703125)

F32_MANT_BITS = 23
F32_BIAS = 127
BF16_MANT_BITS = 7

HIF4_ROUNDING_MODES = ("half_away", "rne", "toward_zero", "stochastic")


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 from the exponent bits; e int32 in [-126, 127] (all uses here stay inside)."""
    return ((e.to(torch.int32) + F32_BIAS) << F32_MANT_BITS).view(torch.float32)


def _round_mantissa_rne(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Round non-negative finite fp32 to `keep` mantissa bits, ties to even, on the bit pattern.

    A carry out of the mantissa bumps the exponent, which is the right answer (1.11|1 -> 10.00)."""
    drop = F32_MANT_BITS - keep
    bits = x.view(torch.int32)
    lsb = (bits >> drop) & 1
    bits = (bits + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
    return bits.view(torch.float32)


def _round_quarters(v: torch.Tensor, rounding: str, uniform: torch.Tensor | None) -> torch.Tensor:
    """Round non-negative v (the magnitude in units of one element step) to an integer."""
    if rounding == "half_away":
        # As the golden model and kernel: add 0.5 in fp32, truncate. (v >= 0: half-up = half-away.)
        return torch.floor(v + 0.5)
    if rounding == "rne":
        return torch.round(v)
    if rounding == "toward_zero":
        return torch.floor(v)
    if rounding == "stochastic":
        if uniform is None:
            raise ValueError("stochastic rounding needs `uniform` (U[0,1) draws of x's shape)")
        return round_stochastic(v, uniform)  # floor(v + u) evaluated exactly, as for every format
    raise ValueError(f"unknown rounding {rounding!r}; known: {', '.join(HIF4_ROUNDING_MODES)}")


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.float32:
        raise TypeError(f"hif4 groups must be fp32, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != GROUP_SIZE:
        raise ValueError(f"hif4 groups must have a last dim of {GROUP_SIZE}, got shape {tuple(x.shape)}")


def encode_groups(x: torch.Tensor, rounding: str = "half_away", uniform=None) -> dict[str, torch.Tensor]:
    """Encode fp32 groups [..., 64] into HiF4 codes (all uint8, one field per byte, low bits):

    * "elements" [..., 64]: bit 3 = sign (x's sign bit), bits 0-2 = q, magnitude q/4.
    * "scale_e6m2" [...]: level-1 E6M2 code, (E << 2) | M, value 2^(E-48) * (1 + M/4); 0xFF = NaN group.
    * "exp_l2" [..., 8]: level-2 bit of each 8-element sub-group (scale x2 when set).
    * "exp_l3" [..., 16]: level-3 bit of each 4-element sub-group (scale x2 when set).

    Only the element rounding follows `rounding`; the scales are always chosen as defined."""
    _check(x)
    if rounding not in HIF4_ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; known: {', '.join(HIF4_ROUNDING_MODES)}")
    if rounding == "stochastic" and (uniform is None or uniform.shape != x.shape):
        raise ValueError("stochastic rounding needs `uniform` with x's shape")
    lead = x.shape[:-1]
    finite = torch.isfinite(x)
    group_ok = finite.all(dim=-1)
    a = torch.where(finite, x.abs(), torch.zeros_like(x))

    # Level 1: amax * bf16(1/7), rounded to bf16, clamped into E6M2's range, rounded to E6M2.
    amax = a.amax(dim=-1)
    sf = _round_mantissa_rne(amax * INV_GROUP_MAX_BF16, BF16_MANT_BITS)
    sf = _round_mantissa_rne(sf.clamp(E6M2_MIN, E6M2_MAX), E6M2_MAN_BITS)
    sf_bits = sf.view(torch.int32)
    exp = (sf_bits >> F32_MANT_BITS) - F32_BIAS  # -48..15
    man = (sf_bits >> (F32_MANT_BITS - E6M2_MAN_BITS)) & ((1 << E6M2_MAN_BITS) - 1)
    scale_code = ((exp + E6M2_BIAS) << E6M2_MAN_BITS) | man
    scale_code = torch.where(group_ok, scale_code, torch.full_like(scale_code, E6M2_NAN))

    # The hardware multiplies by a bf16 reciprocal of S rather than dividing by S.
    rcp_table = torch.tensor(RCP_E6M2_MANTISSA, dtype=torch.float32, device=x.device)
    rcp = _pow2(-exp) * rcp_table[man.long()]
    p = a * rcp.unsqueeze(-1)  # fp32 product: the one place the conversion rounds besides q

    # Levels 2 and 3 from the sub-group maxima of p (rounding is monotone, so max(p) = max(a) * r).
    # View the group as [8 level-2 sub-groups, 2 level-3 sub-groups each, 4 elements].
    p4 = p.reshape(*lead, N_L2, L2_SIZE // L3_SIZE, L3_SIZE)
    p3 = p4.amax(dim=-1)  # [..., 8, 2]
    l2 = p3.amax(dim=-1) >= L2_THRESHOLD  # [..., 8]
    # l3: p3 / 2^l2 >= 2, written without the division (the same test: halving is exact here).
    l3 = p3 >= torch.where(l2, 2 * L3_THRESHOLD, L3_THRESHOLD).unsqueeze(-1)  # [..., 8, 2]
    de = l2.unsqueeze(-1).to(torch.int32) + l3.to(torch.int32)  # 0..2 per 4-element sub-group

    v = p4 * _pow2(ELEMENT_FRAC_BITS - de).unsqueeze(-1)  # magnitude in element steps (exact scaling)
    u4 = uniform.reshape(p4.shape) if rounding == "stochastic" else None
    q = _round_quarters(v, rounding, u4).clamp(max=ELEMENT_MAX_CODE).reshape(x.shape)  # saturate at 1.75
    # Sign from the sign bit (as the kernel): -0.0 stays -0.0, so quantize(-x) == -quantize(x) bit for bit.
    code = q.to(torch.int32) | (torch.signbit(x).to(torch.int32) << ELEMENT_SIGN_BIT)

    bad = ~group_ok
    code = torch.where(bad.unsqueeze(-1), torch.zeros_like(code), code)
    l2 = l2 & group_ok.unsqueeze(-1)
    l3 = l3.reshape(*lead, N_L3) & group_ok.unsqueeze(-1)
    return {
        "elements": code.to(torch.uint8),
        "scale_e6m2": scale_code.to(torch.uint8),
        "exp_l2": l2.to(torch.uint8),
        "exp_l3": l3.to(torch.uint8),
    }


def decode_groups(codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 values [..., 64] of HiF4 codes from `encode_groups`. Every product is exact."""
    elements = codes["elements"].to(torch.int32)
    scale_code = codes["scale_e6m2"].to(torch.int32)
    l2 = codes["exp_l2"].to(torch.int32)
    l3 = codes["exp_l3"].to(torch.int32)

    exp = (scale_code >> E6M2_MAN_BITS) - E6M2_BIAS
    man = scale_code & ((1 << E6M2_MAN_BITS) - 1)
    scale = _pow2(exp) * (1.0 + man.to(torch.float32) / (1 << E6M2_MAN_BITS))
    scale = torch.where(scale_code == E6M2_NAN, torch.full_like(scale, float("nan")), scale)

    lead = elements.shape[:-1]
    de = l2.unsqueeze(-1) + l3.reshape(*lead, N_L2, L2_SIZE // L3_SIZE)  # [..., 8, 2]
    q = (elements & ELEMENT_MAX_CODE).to(torch.float32).reshape(*lead, N_L2, L2_SIZE // L3_SIZE, L3_SIZE)
    step = _pow2(de - ELEMENT_FRAC_BITS) * scale[..., None, None]  # S * 2^de / 4, exact
    mag = (q * step.unsqueeze(-1)).reshape(elements.shape)
    negative = ((elements >> ELEMENT_SIGN_BIT) & 1).bool()
    return torch.where(negative, -mag, mag)


def quantize_groups(x: torch.Tensor, rounding: str = "half_away", uniform: torch.Tensor | None = None) -> torch.Tensor:
    """x: fp32 [..., 64]. Dequantized HiF4 values, fp32 [..., 64].

    rounding in {"half_away", "rne", "toward_zero", "stochastic"} applies to the elements; for
    "stochastic", `uniform` holds U[0,1) draws of x's shape and an element becomes floor(v + u).
    A group holding NaN or Inf dequantizes to all-NaN; an all-zero group to zeros."""
    return decode_groups(encode_groups(x, rounding, uniform))


