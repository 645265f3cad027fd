"""Stochastic rounding (tested statistically), the straight-through gradient, encode/decode, and
the compiled fast path against the eager reference."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import hwnoise as hn
from hwnoise.formats import fake_quant as quantize_module
from hwnoise.formats.compiled import COMPILE_MIN_NUMEL

from test_formats_properties import assert_bit_equal

DRAWS = 1000


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxfp8_e4m3", "bf16"])
def test_stochastic_is_reproducible_for_a_seed(fmt):
    x = torch.randn(8, 64)
    a = hn.quantize(x, fmt, rounding="stochastic", seed=3)
    assert torch.equal(a, hn.quantize(x, fmt, rounding="stochastic", seed=3))
    assert not torch.equal(a, hn.quantize(x, fmt, rounding="stochastic", seed=4))


@pytest.mark.parametrize("value,lo,hi", [(2.3, 2.0, 3.0), (0.1, 0.0, 0.5), (4.6, 4.0, 6.0), (-1.2, -1.5, -1.0)])
def test_stochastic_mxfp4_unbiased_and_bracketing(value, lo, hi):
    # Each row is one block whose amax 4 fixes the scale to 1, so draws land on E2M1 points.
    x = torch.zeros(DRAWS, 32)
    x[:, 0], x[:, 1] = 4.0, value
    y = hn.quantize(x, "mxfp4", rounding="stochastic", seed=0)[:, 1]
    assert set(y.unique().tolist()) <= {lo, hi}
    p_hi = (value - lo) / (hi - lo)
    stderr = abs(hi - lo) * math.sqrt(p_hi * (1 - p_hi) / DRAWS)
    assert abs(y.double().mean().item() - value) < 3 * stderr


def test_stochastic_beats_nearest_on_bias():
    # A value just above a grid point: round-to-nearest is always off by the same amount;
    # the mean of stochastic draws is within sampling error of the true value.
    x = torch.full((DRAWS, 16), 2.2)
    x[:, 0] = 6.0
    rne = hn.quantize(x.flatten(), "nvfp4").reshape(DRAWS, 16)[:, 1]
    sr = hn.quantize(x.flatten(), "nvfp4", rounding="stochastic", seed=1).reshape(DRAWS, 16)[:, 1]
    assert abs(rne.double().mean().item() - 2.2) > 0.15
    assert abs(sr.double().mean().item() - 2.2) < 0.05


def test_mxfp4_sr_alias_is_stochastic():
    x = torch.randn(4, 64)
    assert torch.equal(hn.quantize(x, "mxfp4_sr", seed=2), hn.quantize(x, "mxfp4", rounding="stochastic", seed=2))


def test_straight_through_gradient_identity():
    x = torch.randn(4, 64, requires_grad=True)
    y = hn.quantize(x, "mxfp4")
    (y * torch.arange(64.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(64.0).expand(4, 64))


def test_straight_through_gradient_clipped_zeroes_saturated():
    # amax 7.9 -> scale 1 -> 7.9 and 6.5 lie beyond E2M1's 6: gradient zero there, one elsewhere.
    x = torch.zeros(32)
    x[0], x[1], x[2] = 7.9, 6.5, 5.9
    x.requires_grad_(True)
    hn.quantize(x, "mxfp4", ste="clipped").sum().backward()
    assert x.grad[:3].tolist() == [0.0, 0.0, 1.0] and (x.grad[3:] == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8",
                                 "nvfp4", "nvfp4:torchao", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "mxfp4_2d",
                                 "mxfp4:rceil", "mxfp4:even", "mxfp4:ceil"])
def test_decode_of_encode_equals_quantize(fmt, dtype):
    x = (torch.randn(6, 100) * torch.logspace(-3, 3, 100)).to(dtype)
    x[2, 5] = float("nan")
    enc = hn.formats.encode(x, fmt)
    y, q = hn.formats.decode(enc), hn.quantize(x, fmt)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.nan_to_num(1234.5), q.nan_to_num(1234.5))


def test_fp4_codes_are_packed_low_nibble_first():
    # E2M1 codes: 1.0 = 0b0010, 6.0 = 0b0111, -0.5 = 0b1001. amax 6 -> scale 1.
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3] = 1.0, 6.0, -0.5, 0.0
    enc = hn.formats.encode(x, "mxfp4")
    assert enc.codes.dtype == torch.uint8 and enc.codes.numel() == 16
    codes = enc.codes.flatten()
    assert codes[0].item() == 0b0111_0010 and codes[1].item() == 0b0000_1001
    assert enc.scales.flatten().tolist() == [127]


def test_out_parameter_writes_in_place():
    x = torch.randn(8, 64)
    out = torch.empty_like(x)
    r = hn.quantize(x, "mxfp4", out=out)
    assert r is out and torch.equal(out, hn.quantize(x, "mxfp4"))


@pytest.mark.parametrize("fmt,opts", [("mxfp4", {}), ("mxfp4", {"scale_mode": "rceil"}), ("nvfp4", {}),
                                      ("mxfp4", {"rounding": "stochastic", "seed": 5}), ("mxfp8", {}),
                                      ("mxfp4_2d", {}), ("bf16", {}), ("fp16", {}), ("nvfp4", {"flavor": "torchao"}),
                                      ("fp8_e4m3", {}), ("hif4", {})])
def test_compiled_path_equals_eager_bit_for_bit(fmt, opts, monkeypatch):
    n = COMPILE_MIN_NUMEL
    # The second (ragged) shape makes torch.compile recompile with symbolic sizes: check it too.
    for shape in [(n // 512, 512), (n // 300 + 3, 1000)]:
        x = torch.randn(shape) * torch.logspace(-4, 4, shape[1])
        x[3, 7] = float("nan")
        monkeypatch.setenv("HWNOISE_COMPILE", "0")
        eager = hn.quantize(x, fmt, **opts)
        monkeypatch.setenv("HWNOISE_COMPILE", "1")
        compiled = hn.quantize(x, fmt, **opts)
        assert any(key[0].fmt.name == hn.formats.get(fmt).name for key in quantize_module._CACHE.keys())
        assert not quantize_module._CACHE.eager_keys
        assert_bit_equal(eager, compiled, f"{fmt} {opts} compiled")  # signed zeros and NaN included
        out = torch.empty_like(x)
        hn.quantize(x, fmt, out=out, **opts)
        assert_bit_equal(eager, out, f"{fmt} {opts} out=")


# --------------------------------------------------------------------------------------------
# Rounding corners, against exact arithmetic (fractions.Fraction), not the library's own output
# --------------------------------------------------------------------------------------------

E2M1_GRID = [Fraction(v) for v in ("0", "0.5", "1", "1.5", "2", "3", "4", "6")]
INT8_GRID = [Fraction(k, 64) for k in range(128)]  # OCP MX INT8: k * 2^-6, symmetric
# (format, block max that makes the E8M0 scale exactly 1 under floor, grid of magnitudes)
UNIT_SCALE = [("mxfp4", 4.0, E2M1_GRID), ("mxint8", 1.0, INT8_GRID)]


def half_away_reference(x: float, grid: list[Fraction]) -> float:
    """Nearest grid magnitude, ties away from zero, in exact rational arithmetic; sign of x kept."""
    a = abs(Fraction(x))
    best = min(grid, key=lambda g: (abs(g - a), -g))  # on a tie the larger magnitude wins
    return math.copysign(float(best), x)


def around_midpoints(grid: list[Fraction], ulps: int = 2) -> list[float]:
    """Every midpoint between neighbouring grid magnitudes, and the fp32 values a few ulps either side."""
    out = []
    for lo, hi in zip(grid, grid[1:]):
        m = np.float32(float((lo + hi) / 2))
        below = above = m
        for _ in range(ulps):
            below, above = np.nextafter(below, np.float32(0)), np.nextafter(above, np.float32(np.inf))
            out += [float(below), float(above)]
        out.append(float(m))
    return out


@pytest.mark.parametrize("fmt,block_max,grid", UNIT_SCALE, ids=[u[0] for u in UNIT_SCALE])
def test_half_away_just_below_a_midpoint_rounds_down(fmt, block_max, grid):
    # floor(r + 0.5) rounded r = 0.5 - 2^-25 to 1: the fp32 sum 1 - 2^-25 is a tie that rounds to 1.0.
    values = around_midpoints(grid)
    values += [-v for v in values]
    x = torch.zeros(len(values), 32)
    x[:, 0] = block_max  # every row is one block at scale 1: the element grid itself
    x[:, 1] = torch.tensor(values)
    y = hn.quantize(x, fmt, rounding="half_away")[:, 1].tolist()
    expected = [half_away_reference(v, grid) for v in values]
    wrong = [(v.hex(), got, want) for v, got, want in zip(values, y, expected) if got != want]
    assert not wrong, wrong[:5]


def test_half_away_reproducers_from_the_audit():
    x = torch.zeros(32)
    x[0], x[1] = 4.0, float.fromhex("0x1.fffffep-3")  # 0.25 - 2^-26: nearer to 0 than to 0.5
    assert hn.quantize(x, "mxfp4", rounding="half_away")[1].item() == 0.0
    x[0], x[1] = 1.0, float.fromhex("0x1.fffffep-8")  # (1/128) - 2^-31: nearer to 0 than to 1/64
    assert hn.quantize(x, "mxint8", rounding="half_away")[1].item() == 0.0


def test_stochastic_rounding_never_moves_values_on_the_grid():
    # floor(r + u) in fp32 rounds r = 100 + u = 1 - 2^-24 up to 101: an exact grid value moved.
    # The audit's reproducer: 2^20 copies of 100/64 in MX INT8 blocks whose max is 127/64 (scale 1).
    x = torch.full((1 << 15, 33), 100 / 64)
    x[:, 0] = 127 / 64
    x = x.flatten()[: (1 << 20) + (1 << 15)]
    y = hn.quantize(x, "mxint8", rounding="stochastic", seed=0)
    assert torch.equal(y, x)


@pytest.mark.parametrize("fmt,block_max,grid", UNIT_SCALE, ids=[u[0] for u in UNIT_SCALE])
def test_stochastic_rounding_keeps_every_grid_value(fmt, block_max, grid):
    values = [float(g) for g in grid] + [-float(g) for g in grid if g]
    x = torch.zeros(200, len(values) + 1)  # every element with 200 x 4 draws
    x[:, 0] = block_max
    x[:, 1:] = torch.tensor(values)
    for seed in range(4):
        y = hn.quantize(x, fmt, rounding="stochastic", block=x.shape[1], seed=seed)
        assert torch.equal(y, x), seed
