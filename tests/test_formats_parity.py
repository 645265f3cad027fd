"""Bit-exact parity with torchao 0.18 (`torchao.prototype.mx_formats`), the reference emulation.

flavor="torchao" must match torchao everywhere (zero mismatches, NaN equal to NaN). The default
OCP flavor must match it everywhere except where torchao departs from the OCP spec, which the
last tests pin down: blocks whose E8M0 scale is 2^-127, and blocks holding Inf.
"""

import pytest
import torch

import hwnoise as hn

import torchao.prototype.mx_formats.mx_tensor as mx  # noqa: E402  (a dev dependency: never skipped)
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale  # noqa: E402

TORCHAO_ELEMENTS = {
    "mxfp4": torch.float4_e2m1fn_x2,
    "mxfp6_e2m3": DTYPE_FP6_E2M3,
    "mxfp6_e3m2": DTYPE_FP6_E3M2,
    "mxfp8_e4m3": torch.float8_e4m3fn,
    "mxfp8_e5m2": torch.float8_e5m2,
}
MODES = {
    "floor": ScaleCalculationMode.FLOOR,
    "rceil": ScaleCalculationMode.RCEIL,
    "ceil": ScaleCalculationMode.CEIL,
    "even": ScaleCalculationMode.EVEN,
}
SHAPES = [(64, 256), (3, 5, 64), (128, 32)]


def make(kind: str, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(shape, generator=g)
    if kind == "normal":
        return n
    if kind == "student_t":  # heavy tails, 2 degrees of freedom
        chi2 = (torch.randn((2, *shape), generator=g) ** 2).sum(0)
        return n / torch.sqrt(chi2 / 2)
    if kind == "tiny":  # around 1e-38, in and below the fp32 normal range
        return n * 1e-38
    if kind == "huge":  # near fp32 max, all finite
        return torch.sign(n) * torch.empty(shape).uniform_(1e37, 3.0e38, generator=g)  # bf16 rounds 3.4e38 up to inf
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "signed_zeros":
        # -0.0 and +0.0 entries, values of both signs that round to zero (1e-4 of the block amax),
        # and a block that is all -0.0: what each reference does with the sign of zero.
        x = n.clone().flatten()
        x[0::5], x[1::5] = -0.0, 0.0
        x[2::7] = torch.where(n.flatten()[2::7] < 0, -1e-4, 1e-4)
        x[-64:] = -0.0
        return x.reshape(shape)
    if kind == "nonfinite":
        x = n.clone().flatten()
        x[5], x[100], x[-7] = float("nan"), float("inf"), float("-inf")
        return x.reshape(shape)
    raise AssertionError(kind)


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Entries whose bit patterns differ (so -0.0 differs from +0.0), every NaN equal to every NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    both_nan = a.isnan() & b.isnan()
    return int(((a.view(int_view) != b.view(int_view)) & ~both_nan).sum())


def torchao_mx(x, fmt, mode):
    return mx.MXTensor.to_mx(x, TORCHAO_ELEMENTS[fmt], 32, scaling_mode=MODES[mode]).dequantize(x.dtype)


KINDS = ["normal", "student_t", "tiny", "huge", "zero", "signed_zeros", "nonfinite"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fmt", list(TORCHAO_ELEMENTS))
def test_mx_torchao_flavor_is_bit_exact(fmt, mode, kind, dtype):
    for i, shape in enumerate(SHAPES):
        x = make(kind, shape, seed=i).to(dtype)
        ours = hn.quantize(x, fmt, scale_mode=mode, flavor="torchao")
        assert ours.dtype == dtype and ours.shape == x.shape
        assert mismatches(ours, torchao_mx(x, fmt, mode)) == 0, (fmt, mode, kind, shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["normal", "student_t", "huge", "zero", "signed_zeros"])
@pytest.mark.parametrize("mode", ["floor", "rceil"])
@pytest.mark.parametrize("fmt", list(TORCHAO_ELEMENTS))
def test_mx_default_flavor_matches_torchao_where_both_follow_ocp(fmt, mode, kind, dtype):
    for i, shape in enumerate(SHAPES):
        x = make(kind, shape, seed=i).to(dtype)
        assert mismatches(hn.quantize(x, fmt, scale_mode=mode), torchao_mx(x, fmt, mode)) == 0


@pytest.mark.parametrize("mode", ["floor", "rceil"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3"])
def test_mx_default_flavor_departs_only_in_blocks_at_scale_2_pow_minus_127(fmt, mode):
    x = make("tiny", (64, 256))
    ours, ref = hn.quantize(x, fmt, scale_mode=mode), torchao_mx(x, fmt, mode)
    scale_bytes = hn.formats.encode(x, fmt, scale_mode=mode).scales  # [blocks]
    differs = ((ours != ref) & ~(ours.isnan() & ref.isnan())).reshape(-1, 32).any(-1)
    assert differs.any(), "tiny data should reach the 2^-127 scale"
    assert (scale_bytes.flatten()[differs] == 0).all()
    # OCP: the block is scaled by 2^-127 exactly, so a block at amax 1.5 * 2^-126 keeps its values
    # (torchao divides by 2^-126 instead but multiplies back by 2^-127, halving them).
    block = torch.zeros(32)
    block[0], block[1] = 1.5 * 2.0**-126, 2.0**-127
    assert hn.quantize(block, "mxfp4", scale_mode="floor")[:2].tolist() == [1.5 * 2.0**-126, 2.0**-127]
    assert torchao_mx(block.reshape(1, 32), "mxfp4", "floor")[0, 0].item() == 0.75 * 2.0**-126


def test_mx_default_flavor_makes_inf_blocks_nan_where_torchao_saturates():
    x = torch.randn(2, 32)
    x[0, 3] = float("inf")
    ours, ref = hn.quantize(x, "mxfp8_e4m3"), torchao_mx(x, "mxfp8_e4m3", "floor")
    assert ours[0].isnan().all() and not ours[1].isnan().any()
    assert torch.equal(ours[1], ref[1])
    assert ref[0, 3].item() == float("inf") and not ref[0].isnan().any()


def test_rceil_from_bits_where_torchaos_log2_misrounds():
    # amax / 6 = 2^100 * (1 + 2^-22): just above a power of two. The exact ceil(log2) is 101
    # (what cvt.rp to ue8m0 gives); fp32 log2 returns 100 + 3.4e-7, which rounds to 100.0.
    amax = 1.5 * (1 + 2.0**-22) * 2.0**102
    block = torch.zeros(1, 32)
    block[0, 0], block[0, 1] = amax, 0.6 * 2.0**100
    enc = hn.formats.encode(block, "mxfp4", scale_mode="rceil")
    assert int(enc.scales[0]) - 127 == 101
    ref = mx.MXTensor.to_mx(block, torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.RCEIL)
    assert int(ref.scale.view(torch.uint8)[0, 0]) - 127 == 100  # torchao's eager fallback
    # 0.6 * 2^100 / 2^101 = 0.3 -> 0.5 on the E2M1 grid
    assert hn.quantize(block, "mxfp4", scale_mode="rceil")[0, 1].item() == 2.0**100


NV_KINDS = ["normal", "student_t", "huge", "zero", "signed_zeros", "nonfinite"]


def torchao_nvfp4(x):
    x32 = x.float()
    amax = torch.where(torch.isfinite(x32), x32.abs(), 0).amax()
    scale = per_tensor_amax_to_scale(amax) if amax > 0 else None
    return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale).dequantize(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", NV_KINDS + ["tiny_nonzero"])
def test_nvfp4_torchao_flavor_is_bit_exact(kind, dtype):
    for i, shape in enumerate([(64, 256), (4, 8, 48), (32, 16)]):
        if kind == "tiny_nonzero":
            # Around 1e-38 with no exact zeros: torchao's tensor scale is subnormal there and it
            # encodes 0 * inf = NaN as garbage codes; hwnoise keeps zeros zero.
            x = make("normal", shape, seed=i)
            x = torch.where(x >= 0, 1.0, -1.0) * (1.2e-38 + x.abs() * 1e-38)
        else:
            x = make(kind, shape, seed=i)
        x = x.to(dtype)
        assert mismatches(hn.quantize(x, "nvfp4", flavor="torchao"), torchao_nvfp4(x)) == 0, (kind, shape)


# --------------------------------------------------------------------------------------------
# Signed zeros: what -0.0, and a negative value that rounds to zero, become. References disagree;
# each flavor follows its own (README, "Flavors"): torchao keeps -0.0 everywhere; Transformer
# Engine's cast picks a negative code only for a scaled value < 0, so -0.0 becomes +0.
# --------------------------------------------------------------------------------------------


def signed_zero_input(shape=(4, 64)) -> torch.Tensor:
    """Blocks with amax 6 (NVFP4: tensor amax 6, so x * S_enc / s_b == x): -0.0, +0.0, negatives and
    positives that round to zero, and a block that is all -0.0."""
    x = make("normal", shape).clamp(-5, 5)
    x[:, 0] = 6.0
    x[:, 1], x[:, 2], x[:, 3], x[:, 4], x[:, 5] = -0.0, 0.0, -0.1, 0.1, -0.25
    x[:, 17], x[:, 33], x[:, 49] = 6.0, 6.0, 6.0  # every 16- and 32-element block holds the amax
    x[-1, 48:] = -0.0  # the last 16-block: all -0.0
    return x


def torchao_float8(x, fmt):
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig

    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[fmt]
    return hp_tensor_to_float8_dynamic(x, dtype, LinearMMConfig()).to_original_precision()


REFERENCES = {
    **{(fmt, flavor): (lambda x, fmt=fmt: torchao_mx(x, fmt, "floor"))
       for fmt in TORCHAO_ELEMENTS for flavor in ("ocp", "torchao")},
    ("nvfp4", "torchao"): torchao_nvfp4,
    ("fp8_e4m3", None): lambda x: torchao_float8(x, "fp8_e4m3"),
    ("fp8_e5m2", None): lambda x: torchao_float8(x, "fp8_e5m2"),
    ("bf16", None): lambda x: x.to(torch.bfloat16).to(x.dtype),  # the IEEE cast keeps the sign of zero
    ("fp16", None): lambda x: x.to(torch.float16).to(x.dtype),
}


@pytest.mark.parametrize("fmt,flavor", list(REFERENCES), ids=[f"{f}-{fl}" for f, fl in REFERENCES])
def test_signed_zeros_follow_each_flavors_reference(fmt, flavor):
    x = signed_zero_input()
    ours = hn.quantize(x, fmt, **({"flavor": flavor} if flavor else {}))
    ref = REFERENCES[(fmt, flavor)](x)
    assert mismatches(ours, ref) == 0
    assert torch.signbit(ours[:, 1]).all() and not torch.signbit(ours[:, 2]).any()  # -0.0 and +0.0 kept
    assert (ours[:, 3] <= 0).all() and torch.signbit(ours[:, 3]).all()  # -0.1 -> a negative or -0.0


def test_nvfp4_torchao_flavor_keeps_the_sign_of_zero():
    x = signed_zero_input()
    ours = hn.quantize(x, "nvfp4", flavor="torchao")
    assert torch.signbit(ours[:, 1]).all() and torch.signbit(ours[-1, 48:]).all()  # -0.0 stays -0.0
    assert mismatches(ours, torchao_nvfp4(x)) == 0
    enc = hn.formats.encode(x, "nvfp4", flavor="torchao")
    assert mismatches(hn.formats.decode(enc), ours) == 0


def transformer_engine_fp4_codes(v: torch.Tensor) -> torch.Tensor:
    """Transformer Engine's reference `cast_to_fp4x2` (custom_recipes/quantization_nvfp4.py),
    transcribed: E2M1 codes of scaled, clipped values by intervals; -0.0 satisfies `x >= 0.0`."""
    c = torch.zeros_like(v, dtype=torch.uint8)
    for lo_op, lo, hi_op, hi, code in [
        (">=", 0.0, "<=", 0.25, 0), (">", 0.25, "<", 0.75, 1), (">=", 0.75, "<=", 1.25, 2), (">", 1.25, "<", 1.75, 3),
        (">=", 1.75, "<=", 2.5, 4), (">", 2.5, "<", 3.5, 5), (">=", 3.5, "<=", 5.0, 6), (">", 5.0, None, None, 7),
        (">=", -0.25, "<", -0.0, 8), ("<", -0.25, ">", -0.75, 9), ("<=", -0.75, ">=", -1.25, 10),
        ("<", -1.25, ">", -1.75, 11), ("<=", -1.75, ">=", -2.5, 12), ("<", -2.5, ">", -3.5, 13),
        ("<=", -3.5, ">=", -5.0, 14), ("<", -5.0, None, None, 15),
    ]:
        ops = {">=": torch.ge, "<=": torch.le, ">": torch.gt, "<": torch.lt}
        m = ops[lo_op](v, lo) if hi_op is None else ops[lo_op](v, lo) & ops[hi_op](v, hi)
        c[m] = code
    return c[..., ::2] | (c[..., 1::2] << 4)  # low nibble first, as TE packs


def test_nvfp4_nvidia_flavor_signed_zeros_as_transformer_engine():
    x = signed_zero_input()  # amax 6 everywhere: S_enc = 448, s_b = 448, so TE's scaled value is x itself
    enc = hn.formats.encode(x, "nvfp4")
    assert torch.equal(enc.codes.flatten(), transformer_engine_fp4_codes(x).flatten())
    y = hn.quantize(x, "nvfp4")
    assert not torch.signbit(y[:, 1]).any() and not torch.signbit(y[-1, 48:]).any()  # -0.0 -> +0
    assert (y[:, 3] == 0).all() and torch.signbit(y[:, 3]).all()  # -0.1 -> -0.0 (code 8)
    assert (y[:, 5] == 0).all() and torch.signbit(y[:, 5]).all()  # -0.25, a tie to even -> -0.0
    assert mismatches(hn.formats.decode(enc), y) == 0


def test_mxint8_and_hif4_signed_zeros():
    x = signed_zero_input()
    x[:, 3] = -0.01  # rounds to zero in both (scale 4: -0.01 / 4 is below half of 1/64 and of 1/4)
    # MX INT8 is two's complement: there is no -0, both zeros and the negatives that round to zero give +0.
    y = hn.quantize(x, "mxint8")
    assert not torch.signbit(y[:, 1:4]).any() and (y[:, 3] == 0).all()
    # HiF4's golden kernel takes the sign bit of x: -0.0 and negatives that round to zero stay -0.0.
    y = hn.quantize(x, "hif4")
    assert torch.signbit(y[:, 1]).all() and torch.signbit(y[:, 3]).all() and (y[:, 3] == 0).all()
