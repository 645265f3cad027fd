"""Property tests (hypothesis) for every registered format: grids, rounding, idempotence, symmetry,
magnitude bounds, shapes, zeros and non-finite blocks.

The strongest checks compare `quantize` bit for bit with references written here from the format
definitions in numpy: float64 magnitudes rounded onto `element.grid()` by a search over the grid
(ties to the even grid index = the even code), never through the library's exponent-bit rounding.
Block scales are re-derived from the block maxima with `np.frexp`, and the storage form (`encode`)
is read back by hand (E8M0 byte -> 2^(byte-127), E6M2 code -> 2^(E-48) (1 + M/4)).

Edge behaviours (scale caps, fp32 overflow of the MX value 2^128) have their own tests at the
bottom; the reference comparisons keep inputs out of exactly those regions (`_avoid_known_bugs`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hwnoise
from hwnoise.formats import ELEMENTS, decode, encode, get, names

# --------------------------------------------------------------------------------------------
# Parametrization: every registered name (aliases included); hif4 is skipped if it cannot load.
# --------------------------------------------------------------------------------------------


def _param(name: str):
    return name


ALL = [_param(n) for n in names()]
MX = [n for n in names() if get(n).family == "mx"]
BLOCKED = [_param(n) for n in names() if get(n).block is not None]
DETERMINISTIC = ("rne", "half_away", "toward_zero")
ROUNDINGS = DETERMINISTIC + ("stochastic",)
SCALE_MODES = ("floor", "ceil", "even", "rceil")
F32_MAX = float(np.finfo(np.float32).max)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
THOROUGH = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # subnormals to F32_MAX
moderate32 = st.floats(-1000.0, 1000.0, width=32)
# Multiples of 1/8 times small powers of two: exact grid points and exact ties for every element format.
ties32 = st.tuples(st.integers(-64, 64), st.integers(-8, 8)).map(lambda t: float(np.float32(t[0] / 8 * 2.0 ** t[1])))
ELEMENT_VALUES = st.one_of(finite32, moderate32, ties32)


@st.composite
def matrices(draw, max_rows=3, max_cols=80, min_cols=1, elements=ELEMENT_VALUES):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(min_cols, max_cols))
    return draw(hnp.arrays(np.float32, (rows, cols), elements=elements))


def _shape_for(name: str):
    """Matrix sizes that give a format a few (ragged) blocks; 2-D tiles need rows too."""
    fmt = get(name)
    if fmt.block is not None and len(fmt.block) == 2:
        return dict(max_rows=40, max_cols=40)
    if fmt.family == "hif4":
        return dict(max_rows=2, max_cols=140)
    return dict(max_rows=3, max_cols=80)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer bit patterns with every NaN mapped to one pattern (so NaN == NaN, -0.0 != 0.0)."""
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    diff = bits(a) != bits(b)
    if diff.any():
        i = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(f"{what}: first difference at {i}: {a[i].item()!r} vs {b[i].item()!r}")


@functools.lru_cache(maxsize=None)
def grid_np(elem_name: str) -> np.ndarray:
    """Non-negative representable magnitudes of an element format, ascending (float64)."""
    return ELEMENTS[elem_name].grid().numpy()


def round_to_grid(v: np.ndarray, grid: np.ndarray, mode: str) -> np.ndarray:
    """Round non-negative float64 magnitudes onto `grid`, saturating at its top.

    rne: nearest, ties to the even grid index (consecutive grid entries are consecutive codes, so
    an even index is an even code); half_away: nearest, ties up; toward_zero: the grid point below."""
    idx = np.clip(np.searchsorted(grid, v, side="right") - 1, 0, len(grid) - 1)  # grid[idx] <= v
    top = idx == len(grid) - 1
    hi_idx = np.minimum(idx + 1, len(grid) - 1)
    if mode == "toward_zero":
        return grid[idx]
    d_lo, d_hi = v - grid[idx], grid[hi_idx] - v  # exact: few-bit grid points near fp32 values
    tie_up = (idx % 2 == 1) if mode == "rne" else np.ones(idx.shape, dtype=bool)
    up = ((d_hi < d_lo) | ((d_hi == d_lo) & tie_up)) & ~top
    return grid[np.where(up, hi_idx, idx)]


def _tile(block) -> tuple[int, int]:
    return (1, block[0]) if len(block) == 1 else tuple(block)


def block_reduce_max(a: np.ndarray, block) -> np.ndarray:
    """Max over each block of a 2-D array (1-D blocks along the last axis, or 2-D tiles), zero-padded.
    Rows of the result are in the library's block order (row-major over the block grid)."""
    bm, bn = _tile(block)
    r, c = a.shape
    rp, cp = -(-r // bm) * bm, -(-c // bn) * bn
    p = np.zeros((rp, cp), dtype=a.dtype)
    p[:r, :c] = a
    return p.reshape(rp // bm, bm, cp // bn, bn).max(axis=(1, 3))


def expand_blocks(per_block: np.ndarray, block, shape) -> np.ndarray:
    """Broadcast a per-block array back onto the elements of a 2-D array of `shape`."""
    bm, bn = _tile(block)
    return np.repeat(np.repeat(per_block, bm, axis=0), bn, axis=1)[: shape[0], : shape[1]]


def block_ids(shape, block) -> np.ndarray:
    bm, bn = _tile(block)
    nb = -(-shape[1] // bn)
    r, c = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return (r // bm) * nb + c // bn


def floor_log2(a: np.ndarray) -> np.ndarray:
    m, e = np.frexp(a)  # a = m 2^e, m in [0.5, 1)
    return np.where(a == 0, -150, e - 1)


def ceil_log2(a: np.ndarray) -> np.ndarray:
    m, e = np.frexp(a)
    return np.where(a == 0, -150, np.where(m == 0.5, e - 1, e))


def mx_scale_exponent_ref(amax: np.ndarray, elem, scale_mode: str) -> np.ndarray:
    """E8M0 exponents from float64 block maxima (fp32 values), written from the rules' descriptions."""
    emax = math.frexp(elem.max_normal)[1] - 1  # floor(log2(max_normal)): 2 for E2M1, 8 for E4M3, 0 for INT8
    if scale_mode == "floor":  # OCP MX v1.0: floor(log2(amax)) - emax_elem
        s = floor_log2(amax) - emax
    elif scale_mode == "ceil":
        s = ceil_log2(amax) - emax
    elif scale_mode == "even":  # amax rounded half-up to the element's mantissa width, then floor
        mb = elem.mbits if elem.kind == "float" else elem.mbits - 1
        m, e = np.frexp(amax)
        rounded_sig = np.floor(2 * m * 2.0**mb + 0.5) / 2.0**mb  # in [1, 2]; 2 is a carry
        s = np.where(amax < 2.0**-126, floor_log2(amax), e - 1 + (rounded_sig >= 2)) - emax
    else:  # rceil: ceil(log2(fp32(amax / max_normal)))
        with np.errstate(under="ignore"):
            q = (amax.astype(np.float32) / np.float32(elem.max_normal)).astype(np.float64)
        s = ceil_log2(q)
    return np.clip(s, -127, 127)


def mx_reference(x: np.ndarray, name: str, scale_mode: str, rounding: str, block=None):
    """OCP MX fake-quant of a finite fp32 matrix: (values, E8M0 exponents per block)."""
    fmt = get(name)
    block = block or fmt.block
    a = np.abs(x.astype(np.float64))
    s_block = mx_scale_exponent_ref(block_reduce_max(a, block), fmt.element, scale_mode)
    s = expand_blocks(s_block, block, x.shape).astype(np.float64)
    q = round_to_grid(a * 2.0 ** (-s), grid_np(fmt.element.name), rounding)  # exact power-of-two scaling
    with np.errstate(over="ignore"):  # only non-floor scale modes can reach 2^128 (-> inf, as the library)
        y = np.copysign(q * 2.0**s, x).astype(np.float32)  # exact: few bits
    if fmt.element.kind == "int":  # two's complement: zero has no sign
        y = np.where(y == 0, np.float32(0), y)
    return y, s_block


def _scale_quotient(numerator: float, amax: np.float32, exact: bool) -> np.float32:
    """fp32 numerator / amax: correctly rounded (`exact`, as Transformer Engine's torch.div of two
    fp32 tensors and torchao's float64 division), or numerator * fp32(1 / amax), which is what
    PyTorch evaluates for `python_float / tensor` (the library divides tensor by tensor: test_tensor_scale_quotient_rounded_once)."""
    f = np.float32
    return f(numerator) / amax if exact else f(numerator) * (f(1) / amax)


def nvfp4_reference(x: np.ndarray, rounding: str, exact_division: bool = True):
    """NVFP4 as Transformer Engine's reference quantizer (fp32 arithmetic, in numpy):
    S_enc = 2688 / amax_t, s_b = e4m3(amax_b * (S_enc * (1/6))), q = e2m1(x * 1/(s_b * (1/S_enc))),
    y = (q * s_b) * (1/S_enc). Returns (values, block scales)."""
    f = np.float32
    with np.errstate(over="ignore", divide="ignore", under="ignore", invalid="ignore"):
        a = np.abs(x)
        amax_t = a.max()
        s_enc = min(_scale_quotient(2688, amax_t, exact_division), f(F32_MAX)) if amax_t > 0 else f(1)
        s_dec = f(1) / s_enc
        mult = s_enc * (f(1) / f(6))
        raw = np.minimum(np.minimum(block_reduce_max(a, (16,)) * mult, f(F32_MAX)), f(448))
        bs = round_to_grid(raw.astype(np.float64), grid_np("e4m3"), "rne").astype(np.float32)
        bse = expand_blocks(bs, (16,), x.shape)
        enc = np.minimum(f(1) / (bse * s_dec), f(F32_MAX))
        v = np.clip(x * enc, f(-6), f(6))
        mag = round_to_grid(np.abs(v).astype(np.float64), grid_np("e2m1"), rounding)
        # TE's cast_to_fp4x2 takes a negative code only for v < 0: -0.0 becomes +0.
        q = np.where(v < 0, -mag, mag).astype(np.float32)
        y = (q * bse) * s_dec
    return y.astype(np.float32), bs


def per_tensor_reference(x: np.ndarray, elem_name: str, rounding: str, exact_division: bool = True) -> np.ndarray:
    """Per-tensor FP8 (torchao.float8 convention): scale = max_elem / amax, y = q(x * scale) / scale."""
    f = np.float32
    amax = np.abs(x).max()
    scale = _scale_quotient(ELEMENTS[elem_name].max_normal, amax, exact_division) if amax > 0 else f(1)
    with np.errstate(over="ignore"):
        v = x * scale
    q = np.copysign(round_to_grid(np.abs(v).astype(np.float64), grid_np(elem_name), rounding), v).astype(np.float32)
    return q / scale


def _avoid_known_bugs(name: str, x: np.ndarray, scale_mode: str | None = None) -> np.ndarray:
    """Move an input out of the edge regions pinned by the tests at the bottom, by exact
    power-of-two rescaling (cheaper for hypothesis than rejecting the example)."""
    fam = get(name).family
    amax = float(np.abs(x).max()) if x.size else 0.0
    if fam == "mx" and scale_mode not in (None, "floor") and amax > 2.0**127:
        # test_mx_scale_modes_above_2_pow_127_overflow_fp32: a block max can round to 2^128.
        x = np.where(np.abs(x) > 2.0**127, x * np.float32(0.25), x)
    if fam in ("per_tensor", "nvfp4") and amax >= F32_MAX * (1 - 2.0**-20):
        # The library clamps a result that rounds past F32_MAX (test_huge_tensor_amax_stays_finite);
        # the numpy references do not.
        x = np.where(np.abs(x) >= F32_MAX * (1 - 2.0**-20), x * np.float32(0.5), x)
    if fam == "per_tensor" and 0 < amax <= get(name).element.max_normal / F32_MAX * 2:
        # The library caps max_elem / amax at F32_MAX (test_per_tensor_tiny_amax_stays_finite).
        x = x * np.float32(2.0**100)
    return x.astype(np.float32)


def _quantize_np(x: np.ndarray, name: str, **kw) -> torch.Tensor:
    return hwnoise.quantize(torch.from_numpy(x.copy()), name, **kw)


# --------------------------------------------------------------------------------------------
# decode(encode(x)) == quantize(x), bit for bit, for every format, rounding and a few spec strings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL + ["mxfp4:rceil", "mxfp8_e4m3:ceil", "mxfp6_e3m2:even", "mxfp4:torchao",
                                        "nvfp4:torchao", "mxint8:block=16"])
@FAST
@given(data=st.data())
def test_decode_encode_equals_quantize(name, data):
    x = data.draw(matrices(**_shape_for(name.split(":")[0])), label="x")
    rounding = data.draw(st.sampled_from(ROUNDINGS), label="rounding")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    xt = torch.from_numpy(x)
    fmt = get(name)
    y = hwnoise.quantize(xt, name, rounding=rounding, seed=seed)
    back = decode(encode(xt, fmt, rounding=rounding, seed=seed))
    assert_bit_equal(back, y, "decode(encode(x)) vs quantize(x)")


# --------------------------------------------------------------------------------------------
# Independent references, bit for bit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MX)
@THOROUGH
@given(data=st.data())
def test_mx_matches_reference(name, data):
    """Every MX format, every scale mode, every deterministic rounding: values and E8M0 bytes."""
    x = data.draw(matrices(**_shape_for(name)), label="x")
    scale_mode = data.draw(st.sampled_from(SCALE_MODES), label="scale_mode")
    rounding = data.draw(st.sampled_from(DETERMINISTIC), label="rounding")
    y_ref, s_ref = mx_reference(x, name, scale_mode, rounding)
    xt = torch.from_numpy(x)
    y = hwnoise.quantize(xt, name, scale_mode=scale_mode, rounding=rounding)
    assert_bit_equal(y, torch.from_numpy(y_ref), f"{name} {scale_mode} {rounding}")
    enc = encode(xt, name, scale_mode=scale_mode, rounding=rounding)
    np.testing.assert_array_equal(enc.scales.numpy().astype(np.int64), (s_ref + 127).reshape(-1))


@pytest.mark.parametrize("name", MX)
@FAST
@given(data=st.data())
def test_mx_outputs_on_grid_and_bracket_input(name, data):
    """y / 2^s lies on +-grid (s read from the E8M0 bytes), and |y| / 2^s is one of the two grid
    points around |x| / 2^s (or the top, saturated): true for every rounding, stochastic included."""
    x = data.draw(matrices(**_shape_for(name)), label="x")
    scale_mode = data.draw(st.sampled_from(SCALE_MODES), label="scale_mode")
    rounding = data.draw(st.sampled_from(ROUNDINGS), label="rounding")
    seed = data.draw(st.integers(0, 1000), label="seed")
    x = _avoid_known_bugs(name, x, scale_mode)
    fmt = get(name)
    xt = torch.from_numpy(x)
    y = hwnoise.quantize(xt, name, scale_mode=scale_mode, rounding=rounding, seed=seed).numpy().astype(np.float64)
    enc = encode(xt, fmt, scale_mode=scale_mode, rounding=rounding, seed=seed)
    s_block = enc.scales.numpy().astype(np.float64).reshape(block_reduce_max(np.abs(x), fmt.block).shape) - 127
    s = expand_blocks(s_block, fmt.block, x.shape)
    grid = grid_np(fmt.element.name)
    r = np.abs(y) * 2.0 ** (-s)  # exact
    assert np.isin(r, grid).all(), r[~np.isin(r, grid)]
    if fmt.element.kind == "int":  # two's complement: zero has no sign
        assert (np.signbit(y) == (np.signbit(x) & (y != 0))).all()
    else:
        assert (np.signbit(y) == np.signbit(x)).all()
    v = np.abs(x.astype(np.float64)) * 2.0 ** (-s)
    lo = round_to_grid(v, grid, "toward_zero")  # the grid point at or below v (the top if v is beyond it)
    hi = np.where(v > lo, grid[np.minimum(np.searchsorted(grid, lo) + 1, len(grid) - 1)], lo)  # at or above
    assert ((r == lo) | (r == hi)).all()
    # Block bound: |y| <= max_normal * 2^s for every block (the E8M0 scale times the element maximum).
    assert (np.abs(y) <= fmt.element.max_normal * 2.0**s).all()


@THOROUGH
@given(x=matrices(max_rows=3, max_cols=70), rounding=st.sampled_from(DETERMINISTIC))
def test_nvfp4_matches_reference(x, rounding):
    x = _avoid_known_bugs("nvfp4", x)
    xt = torch.from_numpy(x)
    y = hwnoise.quantize(xt, "nvfp4", rounding=rounding)
    y_ref, bs_ref = nvfp4_reference(x, rounding)
    assert_bit_equal(y, torch.from_numpy(y_ref), f"nvfp4 {rounding}")
    enc = encode(xt, "nvfp4", rounding=rounding)
    np.testing.assert_array_equal(enc.scales.float().numpy(), bs_ref.reshape(-1))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
@THOROUGH
@given(data=st.data())
def test_per_tensor_matches_reference(name, data):
    x = data.draw(matrices(), label="x")
    rounding = data.draw(st.sampled_from(DETERMINISTIC), label="rounding")
    x = _avoid_known_bugs(name, x)
    y = _quantize_np(x, name, rounding=rounding)
    y_ref = per_tensor_reference(x, get(name).element.name, rounding)
    assert_bit_equal(y, torch.from_numpy(y_ref), f"{name} {rounding}")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@THOROUGH
@given(data=st.data())
def test_cast_matches_reference(name, data):
    """IEEE casts: grid rounding of |x| for |x| <= max_normal (beyond it IEEE overflows to inf)."""
    elem = get(name).element
    x = data.draw(matrices(), label="x")
    rounding = data.draw(st.sampled_from(DETERMINISTIC), label="rounding")
    x = np.clip(x, -elem.max_normal, elem.max_normal).astype(np.float32)  # max_normal is an fp32 value
    y_ref = np.copysign(round_to_grid(np.abs(x).astype(np.float64), grid_np(elem.name), rounding), x).astype(np.float32)
    assert_bit_equal(_quantize_np(x, name, rounding=rounding), torch.from_numpy(y_ref), f"{name} {rounding}")


# --------------------------------------------------------------------------------------------
# Outputs on the block's grid, and never above the next grid point over the block maximum
# --------------------------------------------------------------------------------------------


def _block_grid(name: str, enc, x: np.ndarray):
    """(grid per block [nblocks, k] ascending float64, block id of every element, tolerance).

    The block's representable magnitudes, from the storage form read back by hand."""
    fmt = get(name)
    fam = fmt.family
    if fam == "mx":
        s = enc.scales.numpy().astype(np.float64) - 127
        return grid_np(fmt.element.name)[None, :] * 2.0 ** s[:, None], block_ids(x.shape, fmt.block), 0.0
    if fam == "nvfp4":
        bs = enc.scales.float().numpy()[:, None]
        g = ((grid_np("e2m1").astype(np.float32)[None, :] * bs) * enc.tensor_scale.numpy()).astype(np.float64)
        # x * fp32(1 / (s_b / S_enc)) differs from x / (s_b / S_enc) by a few fp32 ulps.
        return np.sort(g, axis=1), block_ids(x.shape, fmt.block), 2.0**-20
    if fam == "hif4":
        code = enc.extra["scale_e6m2"].numpy().astype(np.int64)
        scale = 2.0 ** ((code >> 2) - 48) * (1 + (code & 3) / 4)  # E6M2: 2^(E-48) (1 + M/4)
        mags = np.unique([q / 4 * 2.0**de for q in range(8) for de in range(3)])  # q/4 * 2^(l2 + l3)
        # The hardware multiplies by bf16(1/S), up to 2^-8 off 1/S: allow that much.
        return mags[None, :] * scale[:, None], block_ids(x.shape, (64,)), 2.0**-7
    if fam == "per_tensor":
        f = np.float32
        g = (grid_np(fmt.element.name).astype(np.float32) / f(enc.tensor_scale.item())).astype(np.float64)
        return g[None, :], np.zeros(x.shape, dtype=np.int64), 2.0**-20
    raise AssertionError(fam)


@pytest.mark.parametrize("name", ALL)
@FAST
@given(data=st.data())
def test_on_grid_and_bounded_by_next_grid_point(name, data):
    """Every |y| is a representable magnitude of its block, and per block max|y| is at most the
    smallest representable magnitude >= max|x| (the top one when max|x| is beyond it): rounding
    never moves past the grid point above the input, and the block maximum can only go up by one
    step. For IEEE casts the "block" is one element and values beyond max_normal overflow to inf by
    design, so there |x| <= max_normal."""
    fmt = get(name)
    x = data.draw(matrices(**_shape_for(name)), label="x")
    rounding = data.draw(st.sampled_from(ROUNDINGS), label="rounding")
    seed = data.draw(st.integers(0, 1000), label="seed")
    x = _avoid_known_bugs(name, x)
    if fmt.family == "cast":
        x = np.where(np.abs(x) > fmt.element.max_normal, np.float32(1), x)
        grid = grid_np(fmt.element.name)
        y = np.abs(_quantize_np(x, name, rounding=rounding, seed=seed).numpy().astype(np.float64))
        assert np.isin(y, grid).all()
        a = np.abs(x.astype(np.float64))
        ceil = grid[np.searchsorted(grid, a, side="left")]
        assert (y <= ceil).all()
        return
    xt = torch.from_numpy(x)
    y = np.abs(hwnoise.quantize(xt, name, rounding=rounding, seed=seed).numpy().astype(np.float64))
    g, ids, tol = _block_grid(name, encode(xt, fmt, rounding=rounding, seed=seed), x)
    on_grid = (y[..., None] == g[ids]).any(-1)
    assert on_grid.all(), (y[~on_grid][:5], g[ids][~on_grid][:1])
    a = np.abs(x.astype(np.float64))
    nblocks = g.shape[0]
    amax = np.zeros(nblocks)
    ymax = np.zeros(nblocks)
    np.maximum.at(amax, ids.reshape(-1), a.reshape(-1))
    np.maximum.at(ymax, ids.reshape(-1), y.reshape(-1))
    target = amax * (1 + tol)
    ceil_idx = np.minimum((g < target[:, None]).sum(axis=1), g.shape[1] - 1)  # first grid point >= target
    ceil = g[np.arange(nblocks), ceil_idx]
    assert (ymax <= ceil).all(), (ymax[ymax > ceil], amax[ymax > ceil], ceil[ymax > ceil])


@pytest.mark.parametrize("name", ALL)
@FAST
@given(data=st.data())
def test_toward_zero_never_increases_magnitude(name, data):
    """|y| <= |x| elementwise for toward_zero. Exact for MX and casts; nvfp4 and per-tensor FP8
    multiply by an fp32 reciprocal of the scale (a few ulps off), hif4 by bf16(1/S) (up to 2^-8 off)."""
    fmt = get(name)
    x = data.draw(matrices(**_shape_for(name)), label="x")
    x = _avoid_known_bugs(name, x)
    if fmt.family == "cast":
        # beyond 2^(emax+1) the grid reference has no binade; the clamp has its own test.
        x = np.where(np.abs(x.astype(np.float64)) >= 2.0 ** (fmt.element.emax + 1), np.float32(1), x)
    tol = {"mx": 0.0, "cast": 0.0, "hif4": 2.0**-7}.get(fmt.family, 2.0**-20)
    y = np.abs(_quantize_np(x, name, rounding="toward_zero").numpy().astype(np.float64))
    assert (y <= np.abs(x.astype(np.float64)) * (1 + tol)).all()


# --------------------------------------------------------------------------------------------
# Idempotence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in names() if get(n).family in ("mx", "cast")])
@THOROUGH
@given(data=st.data())
def test_idempotent_mx_and_casts(name, data):
    """MX: the scale comes from the block maximum's binade, and the quantized maximum stays in that
    binade (grid points >= 2^emax round to >= 2^emax; saturation stops at max_normal < 2^(emax+1)),
    so the second pass picks the same scale and every value is already on its grid. ceil and rceil:
    the maximum can fall to the binade below, and then the second scale is half the first, whose grid
    holds every doubled value. "even": with nearest rounding a maximum whose rounding carried into
    the next binade rounds up onto 2^emax itself. Casts: trivially."""
    x = data.draw(matrices(**_shape_for(name)), label="x")
    scale_mode = data.draw(st.sampled_from(SCALE_MODES if get(name).family == "mx" else (None,)), label="scale_mode")
    # "even" with toward_zero is the one exception: see test_mx_even_toward_zero_not_idempotent.
    rounding = data.draw(st.sampled_from(("rne", "half_away") if scale_mode == "even" else DETERMINISTIC),
                         label="rounding")
    x = _avoid_known_bugs(name, x, scale_mode)
    kw = dict(rounding=rounding, scale_mode=scale_mode)
    y = _quantize_np(x, name, **kw)
    assert_bit_equal(hwnoise.quantize(y, name, **kw), y, f"{name} {kw}")


def test_mx_even_toward_zero_not_idempotent():
    # A definition property, not a bug: "even" rounds the block max 31 = 1.9375 * 2^4 to 3 mantissa
    # bits with a carry (2^5), so s = 5 - 8 = -3; 31 * 8 = 248 -> toward_zero on E4M3 (step 16) ->
    # 240 -> 30. Second pass: 30 = 1.875 * 2^4 rounds without a carry, s = -4, 30 * 16 = 480
    # saturates at 448 -> 28. Nearest rounding gives 248 -> 256 -> 32, a fixed point.
    x = torch.tensor([31.0])
    y = hwnoise.quantize(x, "mxfp8_e4m3", scale_mode="even", rounding="toward_zero")
    assert y.item() == 30.0
    assert hwnoise.quantize(y, "mxfp8_e4m3", scale_mode="even", rounding="toward_zero").item() == 28.0
    assert hwnoise.quantize(x, "mxfp8_e4m3", scale_mode="even", rounding="rne").item() == 32.0


def _planted_amax(x: np.ndarray, target: float) -> np.ndarray:
    """Scale x into [-target, target] and set one element to exactly +-target (fp32)."""
    amax = float(np.abs(x).max())
    x = (x.astype(np.float64) * (target / amax if amax > 0 else 1.0)).clip(-target, target).astype(np.float32)
    x.flat[int(np.abs(x).argmax())] = np.float32(target)
    return x


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
@THOROUGH
@given(data=st.data())
def test_per_tensor_idempotence(name, data):
    """Per-tensor FP8 is idempotent only when the fp32 scale max_elem / amax is exact: in general
    y's amax is fp32(max_elem / scale), a few ulps off amax, so the second scale differs by ulps
    (e.g. fp8_e4m3 rne on a random tensor moves values by 1 ulp, and toward_zero can drop a value
    that landed at q * (1 - ulp) to the grid point below). Checked:
    (a) amax = max_elem * 2^k (scale = 2^-k exact): exactly idempotent for every deterministic rounding;
    (b) any tensor, nearest roundings: the second pass keeps every element code (only the fp32
        tensor scale drifts)."""
    elem = get(name).element
    rounding = data.draw(st.sampled_from(DETERMINISTIC), label="rounding")
    x = data.draw(matrices(elements=moderate32), label="x")
    k = data.draw(st.integers(-30, 30), label="k")
    xk = _planted_amax(x, elem.max_normal * 2.0**k)
    y = _quantize_np(xk, name, rounding=rounding)
    assert_bit_equal(hwnoise.quantize(y, name, rounding=rounding), y, "power-of-two scale")

    x = data.draw(matrices(), label="x_any")
    x = _avoid_known_bugs(name, x)
    if rounding != "toward_zero":
        y = _quantize_np(x, name, rounding=rounding)
        c1 = encode(torch.from_numpy(x), name, rounding=rounding).codes
        c2 = encode(y, name, rounding=rounding).codes
        assert torch.equal(c1, c2)


@THOROUGH
@given(x=matrices(max_rows=3, max_cols=70, elements=moderate32), k=st.integers(-20, 20),
       rounding=st.sampled_from(("rne", "half_away")))
def test_nvfp4_idempotence(x, k, rounding):
    """NVFP4 is not idempotent in general: (1) y's tensor amax is (6 * 448) * fp32(1/S_enc), not
    amax, so S_enc changes by ulps; (2) a subnormal E4M3 block scale can leave the block maximum at
    q = 3 or 4 instead of 6, and the next pass derives a smaller block scale from it; (3) toward_zero
    can round the block maximum itself down (x * fp32(1/(s_b/S_enc)) = 5.99.. -> 4), again changing
    the next block scale (see test_nvfp4_toward_zero_not_idempotent).
    Without those three causes it is: tensor amax = 2688 * 2^k (S_enc = 2^-k exact), every block
    maximum 0 or >= amax / 448 / 64 (normal E4M3 block scales), nearest roundings."""
    target = 2688.0 * 2.0**k
    x = _planted_amax(x, target)
    threshold = np.float32(target / 448 / 64)  # s_b = amax_b * S_enc / 6 >= 2^-6
    for r in range(x.shape[0]):
        for c0 in range(0, x.shape[1], 16):
            blk = x[r, c0:c0 + 16]
            if 0 < np.abs(blk).max() < threshold:
                blk[np.abs(blk).argmax()] = np.copysign(threshold, blk[np.abs(blk).argmax()])
    y = _quantize_np(x, "nvfp4", rounding=rounding)
    # Up to the sign of zero: TE's cast gives a negative that rounds to zero -0.0, and -0.0 itself +0.
    assert_bit_equal(hwnoise.quantize(y, "nvfp4", rounding=rounding) + 0.0, y + 0.0, "nvfp4")


def test_nvfp4_toward_zero_not_idempotent():
    # Worked counterexample (a definition property, not a bug): tensor amax 2688 -> S_enc = 1.
    # Block 2 max 2685.3: s_b = e4m3(2685.3 / 6 = 447.55) = 448, v = 2685.3 / 448 = 5.994 -> q = 4
    # (toward zero) -> 1792. Second pass: amax_b = 1792 -> s_b = e4m3(298.67) = 288, and a value
    # 448 (q = 1 * 448) becomes 1.556 * 288 -> q = 1.5 -> 432.
    x = torch.zeros(32)
    x[0] = 2688.0
    x[16], x[17] = 2685.3, 500.0
    y = hwnoise.quantize(x, "nvfp4", rounding="toward_zero")
    assert y[16].item() == 1792.0 and y[17].item() == 448.0
    yy = hwnoise.quantize(y, "nvfp4", rounding="toward_zero")
    assert yy[16].item() == 1728.0 and yy[17].item() == 432.0


@FAST
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 3).map(lambda g: 64 * g)),
                    elements=moderate32),
       ks=st.lists(st.integers(-40, 12), min_size=9, max_size=9), rounding=st.sampled_from(DETERMINISTIC))
def test_hif4_idempotence_power_of_two_scales(x, ks, rounding):
    """HiF4 multiplies by bf16(1/S), which is 1/S only for power-of-two S, so it is not idempotent in
    general (tests/test_hif4.py has the worked counterexample). A group with max exactly 7 * 2^k has
    S = E6M2(bf16(7 * 2^k * bf16(1/7))) = 2^k, and then it is."""
    x = x.copy()
    groups = x.reshape(-1, 64)
    for i, g in enumerate(groups):
        groups[i] = _planted_amax(g[None, :], 7.0 * 2.0 ** ks[i])[0]
    y = _quantize_np(x, "hif4", rounding=rounding)
    assert (encode(torch.from_numpy(x), "hif4", rounding=rounding).extra["scale_e6m2"] & 3 == 0).all()
    assert_bit_equal(hwnoise.quantize(y, "hif4", rounding=rounding), y, "hif4")


# --------------------------------------------------------------------------------------------
# Sign symmetry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@FAST
@given(data=st.data())
def test_sign_symmetric(name, data):
    """quantize(-x) == -quantize(x) bit for bit (signed zeros included): every format rounds
    magnitudes. Also for stochastic rounding with a fixed seed (the same draws meet the same |x|)."""
    x = data.draw(matrices(**_shape_for(name)), label="x")
    rounding = data.draw(st.sampled_from(ROUNDINGS), label="rounding")
    xt = torch.from_numpy(x)
    y = hwnoise.quantize(xt, name, rounding=rounding, seed=3)
    neg = hwnoise.quantize(-xt, name, rounding=rounding, seed=3)
    expected = -y
    if get(name).element.kind == "int":  # two's complement: both signs of zero quantize to +0
        neg, expected = neg + 0.0, expected + 0.0
    if get(name).flavor == "nvidia":  # TE: +0 where the scaled value is +-0 (a zero, or an fp32 underflow);
        neg, expected = neg + 0.0, expected + 0.0  # test_nvfp4_nvidia_flavor_signed_zeros_... pins the rule
    assert_bit_equal(neg, expected, f"{name} {rounding}")


# --------------------------------------------------------------------------------------------
# Shapes, dtypes, devices, axes, tiles
# --------------------------------------------------------------------------------------------

SIZES = st.sampled_from([1, 2, 3, 5, 16, 31, 32, 33, 47, 64, 65])
SHORT_SIZES = st.sampled_from([3, 16, 17, 32, 33])


@st.composite
def shaped(draw, min_ndim=1):
    ndim = draw(st.integers(min_ndim, 4))
    shape = [draw(st.integers(1, 2)) for _ in range(ndim)]
    long_axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=2, unique=True))
    shape[long_axes[0]] = draw(SIZES)  # one or two long (often ragged) axes
    if len(long_axes) == 2:
        shape[long_axes[1]] = draw(SHORT_SIZES)
    return tuple(shape)


def _random(shape, dtype, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2.0 ** torch.randint(-8, 8, shape, generator=g)).to(dtype)


@pytest.mark.parametrize("name", ALL)
@settings(FAST, max_examples=12)  # up to ~25k elements and five quantize calls per example
@given(data=st.data())
def test_shape_dtype_device_and_axis(name, data):
    fmt = get(name)
    tile = fmt.block is not None and len(fmt.block) == 2
    shape = data.draw(shaped(min_ndim=2 if tile else 1), label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    x = _random(shape, dtype, data.draw(st.integers(0, 2**16), label="seed"))
    y = hwnoise.quantize(x, name, seed=0)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if fmt.block is None:
        return
    ndim = len(shape)
    if not tile:
        # Any axis: the same as moving that axis last.
        axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
        y = hwnoise.quantize(x, name, axis=axis, rounding="rne")
        assert y.shape == x.shape and y.dtype == x.dtype
        ref = hwnoise.quantize(x.movedim(axis, -1).contiguous(), name, rounding="rne").movedim(-1, axis)
        assert_bit_equal(y, ref, f"axis={axis}")
    if fmt.family in ("mx", "nvfp4") and ndim >= 2:
        # 2-D tiles over any two axes: the same as moving them last; the default is the last two.
        axes = tuple(data.draw(st.lists(st.integers(0, ndim - 1), min_size=2, max_size=2, unique=True), label="axes"))
        y = hwnoise.quantize(x, name, block=(32, 32), axis=axes, rounding="rne")
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        ref = hwnoise.quantize(x.movedim(axes, (-2, -1)).contiguous(), name, block=(32, 32), rounding="rne")
        assert_bit_equal(y, ref.movedim((-2, -1), axes), f"tile axes={axes}")
        default = hwnoise.quantize(x, name, block=(32, 32), rounding="rne")
        assert_bit_equal(default, hwnoise.quantize(x, name, block=(32, 32), axis=(ndim - 2, ndim - 1),
                                                   rounding="rne"), "default tile axes")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 32), (7, 33), (2, 3, 64), (1, 1, 2, 65)])
def test_zero_tensor_gives_zeros(name, dtype, shape):
    x = torch.zeros(shape, dtype=dtype)
    for rounding in ROUNDINGS:
        y = hwnoise.quantize(x, name, rounding=rounding, seed=1)
        assert y.shape == x.shape and y.dtype == dtype
        assert torch.equal(y, x) and not torch.signbit(y).any()


# --------------------------------------------------------------------------------------------
# Non-finite inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BLOCKED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@FAST
@given(data=st.data())
def test_nonfinite_poisons_its_block_only(name, bad, data):
    """Default flavors (MX "ocp", NVFP4 "nvidia", HiF4): a block holding NaN or +-Inf is all NaN;
    the other blocks are what they would be with that element set to 0 (no tensor-level leak:
    NVFP4's tensor amax is over the finite values)."""
    fmt = get(name)
    x = data.draw(matrices(**_shape_for(name), elements=moderate32), label="x")
    pos = (data.draw(st.integers(0, x.shape[0] - 1), label="row"), data.draw(st.integers(0, x.shape[1] - 1), label="col"))
    clean = x.copy()
    clean[pos] = 0
    dirty = x.copy()
    dirty[pos] = bad
    y = _quantize_np(dirty, name, rounding="rne")
    ref = _quantize_np(clean, name, rounding="rne")
    ids = block_ids(x.shape, fmt.block)
    in_block = torch.from_numpy(ids == ids[pos])
    assert torch.isnan(y[in_block]).all()
    assert_bit_equal(y[~in_block], ref[~in_block], "other blocks")


@pytest.mark.parametrize("name", [n for n in names() if get(n).block is None])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_unblocked_formats_elementwise(name, bad):
    fmt = get(name)
    x = torch.tensor([1.0, -2.5, 0.3, 100.0, 0.0])
    dirty = x.clone()
    dirty[1] = bad
    clean = x.clone()
    clean[1] = 0
    y = hwnoise.quantize(dirty, name)
    if fmt.family == "cast" and not math.isnan(bad):
        assert y[1].item() == bad  # IEEE: inf stays inf
    else:
        assert math.isnan(y[1].item())
    keep = torch.arange(5) != 1
    assert_bit_equal(y[keep], hwnoise.quantize(clean, name)[keep])


@pytest.mark.parametrize("name", [_param(n) for n in names() if get(n).family != "cast"])
@FAST
@given(data=st.data())
def test_finite_input_gives_finite_output(name, data):
    """Block formats saturate instead of overflowing: finite in, finite out (IEEE casts excluded:
    they overflow to inf by definition)."""
    x = data.draw(matrices(**_shape_for(name)), label="x")
    x = _avoid_known_bugs(name, x)
    rounding = data.draw(st.sampled_from(ROUNDINGS), label="rounding")
    assert torch.isfinite(_quantize_np(x, name, rounding=rounding, seed=0)).all()


# --------------------------------------------------------------------------------------------
# Edge behaviours found by the property tests (they were bugs; these pin the fixes).
# --------------------------------------------------------------------------------------------


def test_toward_zero_never_overflows_ieee_casts():
    # 65520 -> 65504 already works (floor(65520 / 32) = 2047); 70000 uses quantum 2^(16-10) = 64 and
    # floor(70000 / 64) * 64 = 69952 > 65504 -> inf.
    y = hwnoise.quantize(torch.tensor([65520.0, 70000.0, -1e30]), "fp16", rounding="toward_zero")
    assert y.tolist() == [65504.0, 65504.0, -65504.0]


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_per_tensor_tiny_amax_stays_finite(name):
    x = torch.tensor([1e-37, 0.0, -5e-38])
    y = hwnoise.quantize(x, name)
    assert torch.isfinite(y).all() and y[1].item() == 0.0
    assert y[0].item() > 0  # the amax maps onto max_elem: it must survive (nvfp4 clamps S_enc and keeps it)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "nvfp4"])
def test_huge_tensor_amax_stays_finite(name):
    x = torch.full((16,), F32_MAX)
    assert torch.isfinite(hwnoise.quantize(x, name)).all()


def test_mxint8_has_no_negative_zero():
    # Two's complement INT8 has no -0: quantize gives +0 for -0.0 and for negatives that round to 0,
    # and decode(encode(x)) agrees bit for bit.
    x = torch.zeros(32)
    x[0], x[1], x[2] = -1.0, -0.001, -0.0  # block amax 1 -> s = 0; -0.001 * 64 rounds to 0
    y = hwnoise.quantize(x, "mxint8")
    assert not torch.signbit(y[1]) and not torch.signbit(y[2]) and y[0].item() == -1.0
    assert_bit_equal(decode(encode(x, "mxint8")), y, "mxint8 round trip")


@pytest.mark.parametrize("name, x, expected", [
    # TE: S_enc = fp32(2688 / 5) = 537.59998; y = (6 * 448) * fp32(1 / S_enc) = 5.0000005.
    ("nvfp4", [5.0], 5.000000476837158),
    # torchao.float8 (checked against hp_tensor_to_float8_dynamic(...).to_original_precision()):
    ("fp8_e5m2", [15.0], 15.0),
    ("fp8_e4m3", [13950785.0], 13950784.0),
])
def test_tensor_scale_quotient_rounded_once(name, x, expected):
    assert hwnoise.quantize(torch.tensor(x), name)[0].item() == expected


@pytest.mark.parametrize("scale_mode", ["ceil", "even", "rceil"])
def test_mx_scale_modes_above_2_pow_127_overflow_fp32(scale_mode):
    # Documented behaviour, not a bug: with ceil/even/rceil a block max above 2^127 can round up to
    # the MX value 4 * 2^126 = 2^128, which fp32 cannot hold, so the fp32 result is inf, as a
    # hardware MX-to-fp32 conversion would give. floor never rounds the block max up.
    x = torch.tensor([3.2e38, -3.3e38, 1.0])
    y = hwnoise.quantize(x, "mxfp4", scale_mode=scale_mode)
    assert y[0].item() == float("inf") and y[1].item() == float("-inf")
    assert torch.isfinite(hwnoise.quantize(x, "mxfp4", scale_mode="floor")).all()
