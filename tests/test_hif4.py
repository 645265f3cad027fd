"""HiF4 (Huawei HiFloat4): hand-worked golden values, a scalar reference, bit-level round trips.

The definition and its sources are in the module docstring of hwnoise.formats.hif4 (notes:
/tmp/research/hif4.md). Shorthand used in the comments below:
  c    = bf16(1/7) = 0.142578125
  SF   = bf16_rne(amax * c), clamped to [2^-48, 49152], then rounded to E6M2 (RNE): the scale S
  r    = bf16(1/S): 1 for S = 1, 0.80078125 for S = 1.25, 0.66796875 for 1.5, 0.5703125 for 1.75
  p    = |x| * r;  l2 = max(p over 8) >= 4;  l3 = max(p over 4) / 2^l2 >= 2;  de = l2 + l3
  step = S * 2^de / 4 (the spacing of the sub-group's grid); q = round(p * 2^(2-de)), clipped to 7
No published golden vectors exist (the HiFloat4 repositories compare their numpy model with their
kernels on seeded random data without storing outputs), so there is no ported table.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from hwnoise.formats import hif4
from hwnoise.formats.hif4 import decode_groups, encode_groups, quantize_groups

DETERMINISTIC = ("half_away", "rne", "toward_zero")
ALL_MODES = DETERMINISTIC + ("stochastic",)
U_BELOW_ONE = 1.0 - 2.0**-24  # largest fp32 below 1


def group(values, fill=0.0) -> torch.Tensor:
    """One fp32 group [1, 64]: `values` first, then `fill`."""
    x = torch.full((1, 64), fill, dtype=torch.float32)
    x[0, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, with every NaN mapped to one pattern (so NaN == NaN)."""
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    return t.view(torch.int32)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    diff = bits(a) != bits(b)
    if diff.any():
        i = diff.nonzero()[0].tolist()
        raise AssertionError(f"first difference at {i}: {a[tuple(i)].item()!r} vs {b[tuple(i)].item()!r}")


# --------------------------------------------------------------------------------------------
# Independent scalar reference, written from the definition with Python floats: frexp/round
# instead of bit tricks, 1/S computed and rounded instead of the module's reciprocal table.
# --------------------------------------------------------------------------------------------

def _f32(v: float) -> float:
    return float(np.float32(v))  # round a double to fp32, ties to even


def _round_sig(v: float, sig_bits: int) -> float:
    """Round v > 0 to `sig_bits` significant bits, ties to even (Python's round on exact floats)."""
    if v == 0:
        return 0.0
    m, e = math.frexp(v)  # v = m * 2^e, m in [0.5, 1)
    return round(m * 2**sig_bits) * 2.0 ** (e - sig_bits)


def reference_group(xs: list[float], rounding: str, us: list[float] | None = None) -> list[float]:
    if not all(math.isfinite(v) for v in xs):
        return [math.nan] * 64
    a = [abs(v) for v in xs]
    c = _round_sig(_f32(1 / 7), 8)
    sf = _round_sig(_f32(max(a) * c), 8)  # fp32 product (exact in double, rounded once), then bf16
    sf = min(max(sf, 2.0**-48), 49152.0)
    s = _round_sig(sf, 3)  # E6M2: 1 + 2 mantissa bits
    r = _round_sig(_f32(1 / s), 8)
    p = [_f32(ai * r) for ai in a]
    l2 = [max(p[8 * k: 8 * k + 8]) >= 4 for k in range(8)]
    l3 = [max(p[4 * j: 4 * j + 4]) / 2 ** l2[j // 2] >= 2 for j in range(16)]
    out = []
    for i, v in enumerate(xs):
        de = l2[i // 8] + l3[i // 4]
        t = p[i] * 2.0 ** (2 - de)
        if rounding == "half_away":
            q = math.floor(np.float32(t) + np.float32(0.5))  # fp32 add, as the golden model
        elif rounding == "rne":
            q = round(t)
        elif rounding == "toward_zero":
            q = math.floor(t)
        else:
            q = math.floor(Fraction(t) + Fraction(us[i]))  # exact floor(v + u)
        q = min(q, 7)
        out.append(math.copysign(q / 4 * 2.0**de * s, v))  # the sign bit, so -0.0 stays -0.0
    return out


def reference(x: torch.Tensor, rounding: str, u: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.reshape(-1, 64).tolist()
    urows = u.reshape(-1, 64).tolist() if u is not None else [None] * len(rows)
    out = [reference_group(r, rounding, ur) for r, ur in zip(rows, urows)]
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape)


def random_groups(seed: int, n: int = 96) -> torch.Tensor:
    """Gaussian, heavy-tailed (Cauchy), sparse and tie-rich groups over a wide exponent range,
    including groups whose scale clamps at 2^-48 or 49152."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(n, 64, generator=g) * 2.0 ** torch.randint(-20, 20, (n, 1), generator=g).float()
    cauchy = torch.distributions.Cauchy(0.0, 1.0).sample((n, 64)).float()
    cauchy = cauchy * 2.0 ** torch.randint(-60, 30, (n, 1), generator=g).float()
    sparse = torch.randn(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.1)
    # Multiples of 1/8 under a power-of-two amax: many exact ties at every sub-group level.
    ties = torch.randint(-56, 57, (n, 64), generator=g).float() / 8
    ties[:, 0] = 7.0
    ties = ties * 2.0 ** torch.randint(-10, 10, (n, 1), generator=g).float()
    return torch.cat([gauss, cauchy, sparse, ties]).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

def test_constants():
    assert hif4.GROUP_SIZE == 64
    assert hif4.ELEMENT_MAX == 1.75
    # 64 four-bit elements + E6M2 (8) + 8 level-2 bits + 16 level-3 bits = 288 bits per 64 values.
    assert hif4.BITS_PER_VALUE == (64 * 4 + 8 + 8 + 16) / 64 == 4.5
    assert hif4.GROUP_MAX_MULTIPLE == 7.0
    # The hardware constants are bf16 roundings of 1/7 and of 1/(1 + M/4).
    assert torch.tensor(1 / 7).to(torch.bfloat16).item() == hif4.INV_GROUP_MAX_BF16
    for m, rcp in enumerate(hif4.RCP_E6M2_MANTISSA):
        assert torch.tensor(1 / (1 + m / 4)).to(torch.bfloat16).item() == rcp


def test_e6m2_code_table():
    # Every E6M2 code decodes to 2^(E-48) * (1 + M/4); 0xFF is NaN. Group of q = 4 at de = 0
    # (value 1.0 * S) reads S back.
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    enc = {
        "elements": torch.full((256, 64), 4, dtype=torch.uint8),
        "scale_e6m2": codes,
        "exp_l2": torch.zeros(256, 8, dtype=torch.uint8),
        "exp_l3": torch.zeros(256, 16, dtype=torch.uint8),
    }
    y = decode_groups(enc)[:, 0]
    for code in range(255):
        assert y[code].item() == 2.0 ** ((code >> 2) - 48) * (1 + (code & 3) / 4)
    assert math.isnan(y[255].item())
    assert y[0].item() == 2.0**-48 and y[254].item() == 49152.0


# --------------------------------------------------------------------------------------------
# Hand-worked groups
# --------------------------------------------------------------------------------------------

# amax = 7: 7 * c = 0.998046875 = 2^-1 * 255.5/128 is a bf16 tie; RNE rounds up to 1.0, so S = 1,
# E6M2 code (0 + 48) << 2 | 0 = 0xC0, r = 1 and p = |x|.
#  elements 0-3  [7, 5, 4.5, 3.9]: sub8 #0 max 7 >= 4 -> l2 = 1; sub4 #0 max 7/2 >= 2 -> l3 = 1;
#                de = 2, step 1: 7 -> 7, 5 -> 5, 4.5 tie -> 5 (half away; rne: 4), 3.9 -> 4
#  elements 4-7  [1, 0.3, 0.125, 0.375]: same sub8 (l2 = 1), sub4 max 1/2 < 2 -> l3 = 0; de = 1,
#                step 0.5: 1 -> 1, 0.3 (0.6 steps) -> 0.5, 0.125 (0.25 steps) -> 0, 0.375 (0.75) -> 0.5
#  elements 8-11 [1.5, 0.625, 0.1, -0.3]: sub8 #1 max 3.3 < 4 -> l2 = 0; sub4 max 1.5 < 2 -> l3 = 0;
#                de = 0, step 0.25: 1.5 -> 1.5, 0.625 (2.5 steps, tie) -> 0.75 (rne: 0.5),
#                0.1 (0.4) -> 0, -0.3 (1.2) -> -0.25
#  elements 12-15 [3, 2.2, 0.875, -3.3]: sub4 max 3.3 >= 2 -> l3 = 1; de = 1, step 0.5:
#                3 -> 3, 2.2 (4.4) -> 2, 0.875 (1.75) -> 1, -3.3 (6.6) -> -3.5
HAND_X = [7.0, 5.0, 4.5, 3.9, 1.0, 0.3, 0.125, 0.375, 1.5, 0.625, 0.1, -0.3, 3.0, 2.2, 0.875, -3.3]
HAND_HALF_AWAY = [7.0, 5.0, 5.0, 4.0, 1.0, 0.5, 0.0, 0.5, 1.5, 0.75, 0.0, -0.25, 3.0, 2.0, 1.0, -3.5]
HAND_RNE = [7.0, 5.0, 4.0, 4.0, 1.0, 0.5, 0.0, 0.5, 1.5, 0.5, 0.0, -0.25, 3.0, 2.0, 1.0, -3.5]
# toward zero: 4.5 -> 4, 3.9 -> 3, 0.3 (0.6 steps) -> 0, 0.375 (0.75 steps) -> 0, 0.625 (2.5) -> 0.5,
# -0.3 (1.2) -> -0.25, 2.2 (4.4) -> 2, 0.875 (1.75 steps) -> 0.5, -3.3 (6.6) -> -3
HAND_TOWARD_ZERO = [7.0, 5.0, 4.0, 3.0, 1.0, 0.0, 0.0, 0.0, 1.5, 0.5, 0.0, -0.25, 3.0, 2.0, 0.5, -3.0]


@pytest.mark.parametrize("rounding,expected", [
    ("half_away", HAND_HALF_AWAY), ("rne", HAND_RNE), ("toward_zero", HAND_TOWARD_ZERO)])
def test_hand_worked_group(rounding, expected):
    y = quantize_groups(group(HAND_X), rounding)[0]
    assert_bit_equal(y[:16], torch.tensor(expected))
    assert (y[16:] == 0).all()


def test_hand_worked_codes():
    enc = encode_groups(group(HAND_X))
    assert enc["scale_e6m2"].tolist() == [0xC0]
    assert enc["exp_l2"].tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    assert enc["exp_l3"].tolist() == [[1, 0, 0, 1] + [0] * 12]
    # q = value / step; sign in bit 3: -0.25 at step 0.25 is 8 | 1 = 9, -3.5 at step 0.5 is 8 | 7 = 15.
    assert enc["elements"][0, :16].tolist() == [7, 5, 5, 4, 2, 1, 0, 1, 6, 3, 0, 9, 6, 4, 2, 15]
    assert all(t.dtype == torch.uint8 for t in enc.values())
    assert enc["elements"].shape == (1, 64) and enc["exp_l2"].shape == (1, 8) and enc["exp_l3"].shape == (1, 16)


def test_half_away_ties_at_every_level():
    # S = 1 (amax 7). Ties: 6.5 at step 1 (de 2), 1.25 at step 0.5 (de 1), 0.375 at step 0.25 (de 0).
    #   6.5 -> 7 (rne: 6, even); 1.25 = 2.5 half-steps -> 1.5 (rne: 1.0); 0.375 = 1.5 quarters -> 0.5 (rne 0.5)
    x = group([7.0, 6.5, 0, 0, 1.25, 0, 0, 0, 0.375, 0.125, 0, 0, 0, 0, 0, 0])
    # 0.125 = 0.5 quarters: half away -> 0.25, rne -> 0
    ya = quantize_groups(x, "half_away")[0]
    yr = quantize_groups(x, "rne")[0]
    assert [ya[i].item() for i in (1, 4, 8, 9)] == [7.0, 1.5, 0.5, 0.25]
    assert [yr[i].item() for i in (1, 4, 8, 9)] == [6.0, 1.0, 0.5, 0.0]
    # Negative ties round away from zero too (sign-magnitude).
    assert [quantize_groups(-x, "half_away")[0][i].item() for i in (1, 4, 8, 9)] == [-7.0, -1.5, -0.5, -0.25]


def test_half_away_follows_golden_fp32_add():
    # The golden model and kernel compute floor(v + 0.5) in fp32. For v = 0.5 - 2^-25 the sum
    # 1 - 2^-25 is an fp32 tie between 1 - 2^-24 and 1 and rounds to 1.0, so q = 1 where exact
    # half-away would give 0. We keep the golden behaviour: x = v / 4 = 0.125 - 2^-27 at S = 1, de = 0.
    x = group([7.0] + [0.0] * 7 + [0.125 - 2.0**-27])
    assert quantize_groups(x, "half_away")[0, 8].item() == 0.25
    assert quantize_groups(x, "rne")[0, 8].item() == 0.0


def test_one_large_many_small():
    # amax 7 -> S = 1. A single flat scale with the same top (7 = 7 * step 1) would flush every
    # |x| < 0.5 to zero; the level bits give finer steps to sub-groups without the outlier:
    #  elements 1-3 share the outlier's sub4 (de 2, step 1): 0.45 -> 0
    #  elements 4-7 share only its sub8 (l2 = 1, l3 = 0, de 1, step 0.5): 0.3 (0.6) -> 0.5, 0.45 -> 0.5
    #  elements 8-63: l2 = l3 = 0, de 0, step 0.25: 0.3 (1.2) -> 0.25, 0.45 (1.8) -> 0.5, 0.1 -> 0
    small = [0.3, 0.45, 0.1, 0.3] * 14
    x = group([7.0, 0.45, 0.45, 0.45, 0.3, 0.45, 0.3, 0.45] + small)
    y = quantize_groups(x)[0]
    assert y[:8].tolist() == [7.0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5]
    assert y[8:].tolist() == [0.25, 0.5, 0.0, 0.25] * 14
    enc = encode_groups(x)
    assert enc["exp_l2"].tolist() == [[1] + [0] * 7]
    assert enc["exp_l3"].tolist() == [[1] + [0] * 15]
    # The hierarchy lowers the error against one flat step-1 grid (round(x) clipped at 7).
    flat = torch.clamp(torch.floor(x.abs() + 0.5), max=7) * x.sign()
    assert ((y - x[0]) ** 2).sum() < ((flat[0] - x[0]) ** 2).sum()


def test_saturation_top_of_range():
    # amax 7.9: 7.9 * c = 1.1263... -> bf16 1.125 (144/128) -> E6M2: 1.125 is a tie between 1.0 and
    # 1.25, RNE keeps 1.0 (code 0xC0). p = 7.9 -> de 2, q = floor(8.4) = 8 -> saturates to 7: 7.0.
    y = quantize_groups(group([7.9, -7.9]))[0]
    assert y[:2].tolist() == [7.0, -7.0]
    assert encode_groups(group([7.9]))["scale_e6m2"].tolist() == [0xC0]
    # Largest value: 344064 = 7 * 49152. 344064 * c = 49056 -> bf16 49152 = 2^15 * 1.5 (code 0xFE);
    # r = 2^-15 * 0.66796875, p = 10.5 * 0.66796875 = 7.0137 -> q = 7 -> 7 * 49152.
    # Anything larger clamps SF at 49152 and saturates the same way.
    x = group([344064.0, 1e6, -3e38, 1e30])
    y = quantize_groups(x)[0]
    assert y[:4].tolist() == [344064.0, 344064.0, -344064.0, 344064.0]
    assert encode_groups(x)["scale_e6m2"].tolist() == [0xFE]


def test_scale_rounds_to_nearest_even_and_reciprocal_is_bf16():
    # amax 9.64: 9.64 * c = 1.37445 -> bf16 176/128 = 1.375 -> E6M2 tie between 1.25 and 1.5 -> 1.5
    # (M = 2, even), code 0xC2. r = 0.66796875: p = 6.4392 -> de 2, q = 6 -> 6 * 1.5 = 9.0.
    enc = encode_groups(group([9.64]))
    assert enc["scale_e6m2"].tolist() == [0xC2]
    assert quantize_groups(group([9.64]))[0, 0].item() == 9.0
    # amax 8: 8 * c = 1.140625 (exact bf16) -> E6M2 1.25 (4.5625 quarters -> 5), code 0xC1.
    # r = 0.80078125, p = 6.40625 -> q = 6 -> 6 * 1.25 = 7.5 (with 1/S exactly, p = 6.4 would also give 6).
    assert encode_groups(group([8.0]))["scale_e6m2"].tolist() == [0xC1]
    assert quantize_groups(group([8.0]))[0, 0].item() == 7.5
    # Same S = 1.25 group: 2.5 at elements 4-7 shares the outlier's sub8 (l2 = 1) but not its sub4:
    # p = 2.5 * r = 2.001953125, l3 = (p / 2 >= 2) = 0, de = 1, step 0.625, q = round(4.0039) = 4 -> 2.5.
    # 2.497 at element 8 (sub8 #1): p = 1.99955 < 4 and < 2, so de = 0 with step 0.3125 and
    # q = round(7.998) = 8 saturates at 7 -> 2.1875: the level-3 test uses the unrounded p < 2.
    y = quantize_groups(group([8.0, 0, 0, 0, 2.5, 0, 0, 0, 2.497]))[0]
    assert y[4].item() == 2.5
    assert y[8].item() == 2.1875


def test_small_scale_clamps_at_min():
    # amax 7 * 2^-48: SF = 0.998 * 2^-48 -> bf16 2^-48 = E6M2 minimum (code 0x00), r = 2^48.
    # 2^-50 sits in a de 0 sub-group: p = 0.25, q = 1 -> 2^-50 (smallest non-zero HiF4 value).
    x = group([7 * 2.0**-48, 0, 0, 0, 0, 0, 0, 0, 2.0**-50, 2.0**-53])
    y = quantize_groups(x)[0]
    assert y[0].item() == 7 * 2.0**-48 and y[8].item() == 2.0**-50 and y[9].item() == 0.0
    assert encode_groups(x)["scale_e6m2"].tolist() == [0x00]
    # Far smaller amax: the scale stays clamped at 2^-48 and everything flushes to zero.
    tiny = group([1e-30, -3e-25, 1e-40])
    assert encode_groups(tiny)["scale_e6m2"].tolist() == [0x00]
    assert (quantize_groups(tiny) == 0).all()


def test_all_zero_group():
    for x in (torch.zeros(1, 64), torch.full((1, 64), -0.0)):
        y = quantize_groups(x)
        assert_bit_equal(y, x)  # the sign bit is kept, as the kernel does: -0.0 stays -0.0
        enc = encode_groups(x)
        assert enc["scale_e6m2"].tolist() == [0x00]  # amax 0 -> SF clamps to 2^-48
        assert (enc["elements"] & 7).sum() == 0 and enc["exp_l2"].sum() == 0 and enc["exp_l3"].sum() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rounding", ALL_MODES)
def test_nonfinite_group_is_all_nan(bad, rounding):
    x = torch.randn(3, 64)
    x[1, 17] = bad
    u = torch.rand(3, 64)
    y = quantize_groups(x, rounding, u)
    assert torch.isnan(y[1]).all()
    assert not torch.isnan(y[0]).any() and not torch.isnan(y[2]).any()
    assert_bit_equal(y[[0, 2]], quantize_groups(x[[0, 2]], rounding, u[[0, 2]]))  # groups are independent
    enc = encode_groups(x, rounding, u)
    assert enc["scale_e6m2"][1].item() == hif4.E6M2_NAN
    assert enc["elements"][1].sum() == 0 and enc["exp_l2"][1].sum() == 0 and enc["exp_l3"][1].sum() == 0


@pytest.mark.parametrize("rounding", ALL_MODES)
def test_sign_symmetry(rounding):
    # Sign-magnitude: negating x flips only the element sign bits (zeros included, since the sign
    # bit is copied), so quantize(-x) == -quantize(x) bit for bit; scales do not see the sign.
    x = random_groups(1)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(12))
    assert_bit_equal(quantize_groups(-x, rounding, u), -quantize_groups(x, rounding, u))
    e, en = encode_groups(x, rounding, u), encode_groups(-x, rounding, u)
    for k in ("scale_e6m2", "exp_l2", "exp_l3"):
        assert torch.equal(e[k], en[k])
    assert ((e["elements"] ^ en["elements"]) == 8).all()


# --------------------------------------------------------------------------------------------
# Whole-definition checks against the scalar reference, and the bit-level round trip
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rounding", ALL_MODES)
def test_matches_scalar_reference(rounding):
    x = random_groups(2)
    x[5, 3] = float("nan")
    x[9, 60] = -float("inf")
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) if rounding == "stochastic" else None
    assert_bit_equal(quantize_groups(x, rounding, u), reference(x, rounding, u))


@pytest.mark.parametrize("rounding", ALL_MODES)
@pytest.mark.parametrize("seed", [4, 5])
def test_decode_encode_is_quantize(rounding, seed):
    x = random_groups(seed)
    x[0, 0] = float("inf")
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) if rounding == "stochastic" else None
    enc = encode_groups(x, rounding, u)
    assert_bit_equal(decode_groups(enc), quantize_groups(x, rounding, u))
    assert int(enc["elements"].max()) <= 15 and int(enc["exp_l2"].max()) <= 1 and int(enc["exp_l3"].max()) <= 1


def test_leading_dims():
    x = random_groups(6)[:24].reshape(2, 3, 4, 64)
    y = quantize_groups(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert_bit_equal(y.reshape(-1, 64), quantize_groups(x.reshape(-1, 64)))
    enc = encode_groups(x)
    assert enc["scale_e6m2"].shape == (2, 3, 4) and enc["exp_l3"].shape == (2, 3, 4, 16)
    assert quantize_groups(torch.zeros(0, 64)).shape == (0, 64)


# --------------------------------------------------------------------------------------------
# Idempotence: holds for power-of-two scales, not in general (the reciprocal is bf16(1/S))
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rounding", DETERMINISTIC)
def test_idempotent_for_power_of_two_scales(rounding):
    # One element at exactly +-7 * 2^k makes S = 2^k (see the hand-worked group), r = 1/S exactly,
    # and that element lands on q = 7 again; sub-group maxima keep their level bits.
    g = torch.Generator().manual_seed(7)
    n = 256
    k = torch.randint(-40, 12, (n, 1), generator=g).float()
    x = torch.distributions.StudentT(2.0).sample((n, 64)).float()
    x = x / x.abs().amax(dim=-1, keepdim=True) * 7.0  # amax exactly 7 up to fp32 rounding ...
    x[:, 13] = torch.where(torch.rand(n, generator=g) < 0.5, 7.0, -7.0)  # ... and exactly 7 here
    x = (x.clamp(-7, 7) * 2.0**k).to(torch.float32)
    y = quantize_groups(x, rounding)
    assert (encode_groups(x, rounding)["scale_e6m2"] & 3 == 0).all()  # M = 0: power-of-two scales
    assert_bit_equal(quantize_groups(y, rounding), y)


def test_not_idempotent_for_other_scales():
    # Worked counterexample (definition property, not a bug): x = 8 -> S = 1.25, q = 6 -> 7.5.
    # 7.5 * c = 1.0693 -> bf16 1.0703125 -> E6M2 1.0 (a smaller scale), r = 1, q = round(7.5) = 8
    # -> saturates at 7 -> 7.0.
    y = quantize_groups(group([8.0]))
    assert y[0, 0].item() == 7.5
    assert quantize_groups(y)[0, 0].item() == 7.0


# --------------------------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------------------------

def test_stochastic_extremes_bracket():
    # u = 0 gives floor(v), the lower bracketing grid point (= toward_zero); u -> 1 gives the upper
    # one: at most one step above, never above the saturation code 7.
    x = random_groups(8)
    y0 = quantize_groups(x, "stochastic", torch.zeros_like(x))
    assert_bit_equal(y0, quantize_groups(x, "toward_zero"))
    enc = encode_groups(x, "toward_zero")
    enc1 = encode_groups(x, "stochastic", torch.full_like(x, U_BELOW_ONE))
    for k in ("scale_e6m2", "exp_l2", "exp_l3"):  # scales do not depend on the rounding mode
        assert torch.equal(enc[k], enc1[k])
    step_up = (enc1["elements"] & 7).int() - (enc["elements"] & 7).int()
    assert ((step_up == 0) | (step_up == 1)).all()
    assert (step_up[(enc["elements"] & 7) == 7] == 0).all()
    assert (step_up == 1).float().mean() > 0.5  # random data is almost never on the grid
    # Hand-worked: S = 1, 0.3 in a de 0 sub-group is v = fp32(0.3) * 4 = 1.2000000477 quarters:
    # u = 0 -> 0.25, u -> 1 -> 0.5; up iff u >= 1 - frac(v) = 0.7999999523 (exact in fp32).
    xg = group([7.0, 0, 0, 0, 0, 0, 0, 0, 0.3, -0.3])
    threshold = 2.0 - float(np.float32(0.3)) * 4  # 1 - frac(v)
    just_below = float(np.nextafter(np.float32(threshold), np.float32(0)))
    for u, expected in [(0.0, 0.25), (U_BELOW_ONE, 0.5), (threshold, 0.5), (just_below, 0.25)]:
        y = quantize_groups(xg, "stochastic", torch.full_like(xg, u))[0]
        assert (y[8].item(), y[9].item()) == (expected, -expected)


def test_stochastic_grid_points_stay_for_u_near_one():
    # An fp32 floor(v + u) would turn v = 2, u = 1 - 2^-24 into 3; the exact version keeps 2.
    x = group([7.0, 0, 0, 0, 0, 0, 0, 0, 0.5, 1.25])  # 2 and 5 quarters
    y = quantize_groups(x, "stochastic", torch.full_like(x, U_BELOW_ONE))[0]
    assert y[8].item() == 0.5 and y[9].item() == 1.25
    # Same for whole quantized groups with power-of-two scales (v is an integer there).
    k = torch.randint(-30, 10, (64, 1), generator=torch.Generator().manual_seed(10)).float()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(11))
    x = x / x.abs().amax(dim=-1, keepdim=True) * 6.0
    x[:, 0] = 7.0  # amax exactly 7 * 2^k after the scaling below: S = 2^k
    x = x * 2.0**k
    y = quantize_groups(x)
    assert_bit_equal(quantize_groups(y, "stochastic", torch.full_like(y, U_BELOW_ONE)), y)


def test_stochastic_is_unbiased():
    # 0.3 -> 1.2 quarters at S = 1, de 0: mean of many draws is 0.3 (P(up) = 0.2).
    n = 20000
    x = group([7.0, 0, 0, 0, 0, 0, 0, 0, 0.3]).expand(n, 64).contiguous()
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(9))
    mean = quantize_groups(x, "stochastic", u)[:, 8].double().mean().item()
    assert abs(mean - 0.3) < 4 * 0.25 * math.sqrt(0.16 / n)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

def test_argument_errors():
    with pytest.raises(TypeError):
        quantize_groups(torch.zeros(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(2, 32))
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(2, 64), "nearest")
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(2, 64), "stochastic")
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(2, 64), "stochastic", torch.zeros(64))
