"""Element formats: one table row per format; every grid computation derives from the row.

A minifloat element has `ebits` exponent bits, `mbits` mantissa bits and an exponent `bias`.
Its grid is sign * 2^e * (1 + m / 2^mbits) for normals and sign * 2^emin * (m / 2^mbits) for
subnormals, with emin = 1 - bias. Integer elements (MX INT8) are sign * k * 2^-fraction_bits.

Rounding works on magnitudes: find the binade exponent from the fp32 exponent bits, divide by the
binade's quantum (an exact power of two), round to an integer with the requested mode, multiply
back. Dividing by a power of two is exact, so the only rounding is the one asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROUNDING_MODES = ("rne", "half_away", "toward_zero", "stochastic")

F32_MANTISSA_BITS = 23
F32_EXPONENT_BIAS = 127
F32_EXPONENT_MASK = 0xFF
F32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class ElementFormat:
    """One element format. `max_normal` is the largest finite magnitude."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_normal: float
    kind: str = "float"  # "float" | "int"
    saturate: bool = True  # clamp overflow to max_normal (MX, OCP) or go to inf (IEEE casts)
    has_inf: bool = False
    fraction_bits: int = 0  # int elements: value = k * 2^-fraction_bits

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits if self.kind == "float" else 1 + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (subnormals share its quantum)."""
        return 1 - self.bias if self.kind == "float" else -self.fraction_bits + self.mbits

    @property
    def emax(self) -> int:
        """Exponent of the largest normal: the `emax_elem` of the OCP MX spec."""
        return math.floor(math.log2(self.max_normal))

    @property
    def min_subnormal(self) -> float:
        if self.kind == "int":
            return 2.0 ** -self.fraction_bits
        return 2.0 ** (self.emin - self.mbits)

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    def grid(self) -> torch.Tensor:
        """Every non-negative representable magnitude, ascending (for tests and code tables)."""
        if self.kind == "int":
            top = round(self.max_normal * 2**self.fraction_bits)
            return torch.arange(0, top + 1, dtype=torch.float64) * 2.0**-self.fraction_bits
        values = [m * 2.0 ** (self.emin - self.mbits) for m in range(2**self.mbits)]  # subnormals
        for e in range(self.emin, self.emax + 1):
            values += [2.0**e * (1 + m / 2**self.mbits) for m in range(2**self.mbits)]
        return torch.tensor(sorted(v for v in set(values) if v <= self.max_normal), dtype=torch.float64)


# name -> row. Adding an element format is adding a row.
ELEMENTS: dict[str, ElementFormat] = {
    e.name: e
    for e in (
        ElementFormat("e2m1", ebits=2, mbits=1, bias=1, max_normal=6.0),
        ElementFormat("e2m3", ebits=2, mbits=3, bias=1, max_normal=7.5),
        ElementFormat("e3m2", ebits=3, mbits=2, bias=3, max_normal=28.0),
        ElementFormat("e4m3", ebits=4, mbits=3, bias=7, max_normal=448.0),  # fn: S.1111.111 is NaN
        ElementFormat("e5m2", ebits=5, mbits=2, bias=15, max_normal=57344.0, has_inf=True),
        # OCP MX INT8: two's complement with an implicit 2^-6 scale, kept symmetric (+-127/64).
        ElementFormat("int8", ebits=0, mbits=7, bias=0, max_normal=127 / 64, kind="int", fraction_bits=6),
        # HiF4's S1P2: sign + 3 magnitude bits, magnitudes k/4 for k = 0..7 (sign-magnitude).
        ElementFormat("s1p2", ebits=0, mbits=3, bias=0, max_normal=1.75, kind="int", fraction_bits=2),
        ElementFormat("bf16", ebits=8, mbits=7, bias=127, max_normal=float(torch.finfo(torch.bfloat16).max),
                      saturate=False, has_inf=True),
        ElementFormat("fp16", ebits=5, mbits=10, bias=15, max_normal=65504.0, saturate=False, has_inf=True),
    )
}


def element(name: str) -> ElementFormat:
    try:
        return ELEMENTS[name]
    except KeyError:
        raise ValueError(f"unknown element format {name!r}; known: {', '.join(ELEMENTS)}") from None


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as fp32, exact, for integer exponents in [-149, 127] (built from the bits)."""
    e = exponent.to(torch.int32)
    normal = ((e.clamp(min=-126) + F32_EXPONENT_BIAS) << F32_MANTISSA_BITS).view(torch.float32)
    # 2^-127 .. 2^-149 are fp32 subnormals: a single set mantissa bit.
    sub_bits = torch.bitwise_left_shift(torch.ones_like(e), (e + 149).clamp(0, 22))
    return torch.where(e >= -126, normal, sub_bits.view(torch.float32))


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0 finite, from the exponent bits (subnormals normalized first).

    Gives 128 for inf/nan and -150 for zero; callers clamp."""
    sub = a < 2.0**-126
    scaled = torch.where(sub, a * 2.0**64, a)  # exact: moves fp32 subnormals into the normal range
    e = ((scaled.view(torch.int32) >> F32_MANTISSA_BITS) & F32_EXPONENT_MASK) - F32_EXPONENT_BIAS
    e = torch.where(sub, e - 64, e)
    return torch.where(a == 0, torch.full_like(e, -150), e)


def ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """ceil(log2(a)) from the bits: floor plus one unless the mantissa is zero."""
    sub = a < 2.0**-126
    scaled = torch.where(sub, a * 2.0**64, a)
    bits = scaled.view(torch.int32)
    e = ((bits >> F32_MANTISSA_BITS) & F32_EXPONENT_MASK) - F32_EXPONENT_BIAS
    e = e + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    e = torch.where(sub, e - 64, e)
    return torch.where(a == 0, torch.full_like(e, -150), e)


def round_half_away(r: torch.Tensor) -> torch.Tensor:
    """Round non-negative r to the nearest integer, ties up, exactly. Not floor(r + 0.5): the fp32
    sum rounds first, so r = 0.5 - 2^-25 gives 1 - 2^-25, a tie that rounds to 1.0."""
    whole = torch.floor(r)
    return whole + (r - whole >= 0.5).to(r.dtype)  # r - floor(r) is exact in fp32


def round_stochastic(r: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """floor(r + u) for non-negative r and u in [0, 1), evaluated exactly: up with probability frac(r).

    The fp32 sum r + u can round up across an integer (r = 100, u = 1 - 2^-24 gives 101), which
    would move a value already on the grid. up <=> frac + u >= 1. For frac >= 0.5, 1 - frac is exact
    (Sterbenz); otherwise up needs u > 0.5, where 1 - u is exact, and for u <= 0.5 the rounded
    1 - u >= 0.5 > frac. Same draws, same result as the exact sum: only the misrounded cases change."""
    whole = torch.floor(r)
    frac = r - whole  # exact
    u = uniform.to(torch.float32)
    up = torch.where(frac >= 0.5, u >= 1.0 - frac, frac >= 1.0 - u)
    return whole + up.to(r.dtype)


def _round_integer(r: torch.Tensor, rounding: str, uniform: torch.Tensor | None) -> torch.Tensor:
    """Round non-negative r to an integer, exactly as the mode says (no intermediate fp32 sum)."""
    if rounding == "rne":
        return torch.round(r)  # half to even
    if rounding == "half_away":
        return round_half_away(r)  # r >= 0, so half away from zero is half up
    if rounding == "toward_zero":
        return torch.floor(r)
    if rounding == "stochastic":
        if uniform is None:
            raise ValueError("stochastic rounding needs uniform draws")
        return round_stochastic(r, uniform)
    raise ValueError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDING_MODES)}")


def round_to_element(
    v: torch.Tensor,
    elem: ElementFormat,
    rounding: str = "rne",
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round fp32 `v` onto `elem`'s grid (no scaling). NaN stays NaN; overflow saturates to
    +-max_normal, or becomes +-inf for IEEE formats (`saturate=False`)."""
    a = v.abs()
    if elem.kind == "int":
        quantum_exp = torch.full_like(a, -elem.fraction_bits, dtype=torch.int32)
    else:
        quantum_exp = floor_log2(a).clamp(min=elem.emin, max=elem.emax + 1) - elem.mbits
    # a * 2^-q and back, split in two factors when 2^-q alone would leave the fp32 range (bf16, fp16).
    half = torch.div(quantum_exp, 2, rounding_mode="floor")
    r = a * pow2(-half) * pow2(half - quantum_exp)
    rounded = _round_integer(r, rounding, uniform)
    out = rounded * pow2(half) * pow2(quantum_exp - half)
    if elem.saturate or rounding == "toward_zero":  # IEEE round-toward-zero never overflows
        out = torch.clamp(out, max=elem.max_normal)  # clamp keeps NaN
    else:
        out = torch.where(out > elem.max_normal, torch.full_like(out, float("inf")), out)
    if elem.kind == "int":  # two's complement has no negative zero
        return torch.where(out == 0, out, torch.copysign(out, v))
    return torch.copysign(out, v)


def round_to_element_fast(
    v: torch.Tensor, elem: ElementFormat, rounding: str = "rne", uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """Same as `round_to_element` for saturating formats whose quanta are fp32 normals (every MX
    element): one scaling factor instead of two. Used on the hot path."""
    if not elem.saturate or elem.emin - elem.mbits < -126 or elem.kind == "int":
        return round_to_element(v, elem, rounding, uniform)
    a = v.abs()
    e = ((a.view(torch.int32) >> F32_MANTISSA_BITS) & F32_EXPONENT_MASK) - F32_EXPONENT_BIAS
    q = e.clamp(min=elem.emin, max=elem.emax + 1) - elem.mbits
    r = a * ((F32_EXPONENT_BIAS - q) << F32_MANTISSA_BITS).view(torch.float32)
    rounded = _round_integer(r, rounding, uniform)
    out = rounded * ((q + F32_EXPONENT_BIAS) << F32_MANTISSA_BITS).view(torch.float32)
    return torch.copysign(torch.clamp(out, max=elem.max_normal), v)
