"""Hand-worked golden tables: every expected value below is worked out from the format definitions
in the comments, not produced by the code under test."""

import math

import pytest
import torch

import hwnoise as hn
from hwnoise.formats import get


def mx_block(values, anchor, n=32):
    """A block holding `values`, padded with zeros, whose amax is `anchor` (fixes the scale)."""
    block = torch.zeros(n)
    block[0] = anchor
    block[1 : 1 + len(values)] = torch.tensor(values, dtype=torch.float32)
    return block


# E2M1 with a block scale of 1: amax 4 gives s = floor(log2 4) - emax(2) = 0.
E2M1_RNE = [  # (input, expected) - ties go to the even mantissa
    (0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
    (0.2, 0.0), (0.3, 0.5), (2.6, 3.0), (4.9, 4.0), (5.1, 6.0),
    (-0.75, -1.0), (-2.5, -2.0), (-5.0, -4.0),
]


@pytest.mark.parametrize("x,expected", E2M1_RNE)
def test_e2m1_round_to_nearest_even(x, expected):
    assert hn.quantize(mx_block([x], 4.0), "mxfp4")[1].item() == expected


def test_e2m1_saturates_beyond_6():
    # amax 7.9: s = floor(log2 7.9) - 2 = 0, so 7.9 and 6.5 clamp to the largest element, 6.
    y = hn.quantize(mx_block([6.5, -7.0], 7.9), "mxfp4")
    assert y[:3].tolist() == [6.0, 6.0, -6.0]


@pytest.mark.parametrize("rounding,table", [
    ("half_away", [(0.25, 0.5), (0.75, 1.0), (1.25, 1.5), (2.5, 3.0), (5.0, 6.0), (-0.25, -0.5)]),
    ("toward_zero", [(0.49, 0.0), (1.99, 1.5), (5.99, 4.0), (-2.9, -2.0)]),
])
def test_e2m1_other_roundings(rounding, table):
    xs = [x for x, _ in table]
    y = hn.quantize(mx_block(xs, 4.0), "mxfp4", rounding=rounding)
    assert y[1 : 1 + len(xs)].tolist() == [e for _, e in table]


def test_e4m3_saturation_and_subnormals():
    # amax 480: s = floor(log2 480) - emax(8) = 0. E4M3 max is 448; the smallest subnormal is
    # 2^-9 (bias 7, emin -6, 3 mantissa bits). 2^-10 is a tie between 0 and 2^-9 -> 0 (even);
    # 1.5 * 2^-10 is above the tie -> 2^-9; 3 * 2^-10 = 1.5 * 2^-9, tie between 1 and 2 quanta -> 2.
    # In [16, 32) the quantum is 2: 17 ties to 16 (even), 19 ties to 20.
    vals = [2.0**-10, 1.5 * 2.0**-10, 3 * 2.0**-10, 17.0, 19.0, 464.0, 447.0]
    y = hn.quantize(mx_block(vals, 480.0), "mxfp8_e4m3")
    assert y[0].item() == 448.0
    assert y[1:8].tolist() == [0.0, 2.0**-9, 2 * 2.0**-9, 16.0, 20.0, 448.0, 448.0]


def test_e5m2_saturation_and_subnormals():
    # amax 40000: s = floor(log2 40000) - emax(15) = 0. E5M2: max 57344, smallest subnormal 2^-16;
    # in [32768, 65536) the quantum is 8192: 45056 = 5.5 * 8192 ties to 6 * 8192 = 49152 (even).
    vals = [2.0**-16, 2.0**-17, 45056.0, 3 * 2.0**-17]
    y = hn.quantize(mx_block(vals, 40000.0), "mxfp8_e5m2")
    assert y[0].item() == 40960.0  # 40000 / 8192 = 4.88 -> 5 quanta
    assert y[1:5].tolist() == [2.0**-16, 0.0, 49152.0, 2 * 2.0**-16]


def test_e2m3_and_e3m2_grids():
    # E2M3 (max 7.5): quantum 1/8 below 2, 1/4 in [2, 4), 1/2 in [4, 8). amax 7.5 -> s = 0.
    y = hn.quantize(mx_block([0.0625, 2.125, 5.25, 7.4], 7.5), "mxfp6_e2m3")
    assert y[:5].tolist() == [7.5, 0.0, 2.0, 5.0, 7.5]
    # E3M2 (max 28): quantum 2^-4 below 0.25 (subnormal), 4 in [16, 32). amax 20 -> s = 0.
    y = hn.quantize(mx_block([0.03125, 0.09375, 18.0, 26.0], 20.0), "mxfp6_e3m2")
    assert y[:5].tolist() == [20.0, 0.0, 0.125, 16.0, 24.0]


def test_mxint8_grid():
    # MX INT8: k / 64 with |k| <= 127 (emax 0). amax 1.5 -> s = floor(log2 1.5) - 0 = 0.
    y = hn.quantize(mx_block([1 / 128, 3 / 128, 1.99], 1.5), "mxint8")
    assert y[:4].tolist() == [1.5, 0.0, 2 / 64, 127 / 64]


@pytest.mark.parametrize("mode,amax,expected_exp", [
    # floor: exp(amax) - emax; amax 5.0 (exp 2) -> 0
    ("floor", 5.0, 0),
    # ceil: exp + [mantissa != 0] - emax: 5.0 -> 3 - 2 = 1; 4.0 exactly -> 0
    ("ceil", 5.0, 1), ("ceil", 4.0, 0),
    # even: amax rounded half-up to 1 mantissa bit: 7.0 = 1.75 * 4 -> 2 * 4 = 8 -> 3 - 2 = 1;
    # 6.0 = 1.5 * 4 stays -> 0
    ("even", 7.0, 1), ("even", 6.0, 0),
    # rceil: ceil(log2(amax / 6)): 6.0 -> 0; 6.5 -> 1; 3.0 -> -1
    ("rceil", 6.0, 0), ("rceil", 6.5, 1), ("rceil", 3.0, -1),
])
def test_e8m0_scale_modes(mode, amax, expected_exp):
    enc = hn.formats.encode(mx_block([], amax), "mxfp4", scale_mode=mode)
    assert int(enc.scales[0]) - 127 == expected_exp


def test_e8m0_extremes():
    blocks = torch.stack([
        mx_block([], 1.5 * 2.0**127),  # floor: 127 - 2 = 125
        mx_block([], 2.0**-140),  # subnormal amax: clamps to the smallest scale, 2^-127
        torch.zeros(32),  # all-zero block: scale 2^-127, values 0
        mx_block([float("nan")], 1.0),  # NaN in the block: scale byte 0xFF, the block is NaN
        mx_block([float("inf")], 1.0),  # Inf: NaN block too (OCP flavor)
    ])
    enc = hn.formats.encode(blocks, "mxfp4")
    assert enc.scales.flatten().tolist() == [125 + 127, 0, 0, 0xFF, 0xFF]
    y = hn.quantize(blocks, "mxfp4")
    assert y[0, 0].item() == 1.5 * 2.0**127
    assert y[1, 0].item() == 0.0  # 2^-140 / 2^-127 = 2^-13 rounds to 0 on the E2M1 grid
    assert (y[2] == 0).all() and y[3].isnan().all() and y[4].isnan().all()


def test_nvfp4_nvidia_hand_worked():
    # Tensor amax 2688 -> S_enc = 2688 / 2688 = 1, decode scale 1.
    # Block 0: amax 2688 -> s_b = e4m3(2688 * (1/6)) = 448; 2688 / 448 = 6 -> 6 * 448 = 2688.
    # Block 1: amax 3 -> s_b = e4m3(0.5) = 0.5; encode x2: 3 -> 6, 1.1 -> 2.2 -> 2, -0.6 -> -1.2 -> -1,
    #          0.2 -> 0.4 -> 0.5; decode x0.5: 3, 1, -0.5, 0.25.
    # Block 2: amax 0.01 -> 0.01/6 = 0.00167, E4M3 subnormal quantum 2^-9 = 0.00195 -> s_b = 2^-9;
    #          0.01 * 512 = 5.12, past the 4|6 midpoint 5 -> 6 -> 6 * 2^-9 = 0.01171875.
    # Block 3: amax 0.0005 -> 0.0005/6 = 8.3e-5 rounds to a zero block scale: the block flushes to 0.
    x = torch.zeros(4, 16)
    x[0, 0] = 2688.0
    x[1, :4] = torch.tensor([3.0, 1.1, -0.6, 0.2])
    x[2, 0] = 0.01
    x[3, 0], x[3, 1] = 0.0005, -0.0003
    y = hn.quantize(x.flatten(), "nvfp4").reshape(4, 16)
    assert y[0, 0].item() == 2688.0
    assert y[1, :4].tolist() == [3.0, 1.0, -0.5, 0.25]
    assert y[2, 0].item() == 0.01171875
    assert (y[3] == 0).all()
    enc = hn.formats.encode(x.flatten(), "nvfp4")
    assert enc.scales.float().tolist() == [448.0, 0.5, 2.0**-9, 0.0]
    assert enc.tensor_scale.item() == 1.0


def test_nvfp4_tensor_amax_zero_gives_zeros():
    enc = hn.formats.encode(torch.zeros(32), "nvfp4")
    assert enc.tensor_scale.item() == 1.0  # S_enc falls back to 1 when the tensor amax is 0
    assert (hn.quantize(torch.zeros(32), "nvfp4") == 0).all()


def test_nvfp4_torchao_flavor_clamps_block_scale_to_e4m3_normal():
    # torchao: t = 2688 / 2688 = 1; block amax 0.005 -> 0.005 / 6 = 8.3e-4, clamped up to 2^-6,
    # so the block is encoded x64: 0.32 -> 0.5 -> 0.5 * 2^-6 = 0.0078125.
    # nvidia: s_b = e4m3(8.3e-4); E4M3's smallest subnormal is 2^-9 and 8.3e-4 / 2^-9 = 0.43 -> 0,
    # so the block scale is 0 and the block flushes to zero.
    x = torch.zeros(32)
    x[0], x[16] = 2688.0, 0.005
    assert hn.quantize(x, "nvfp4", flavor="torchao")[16].item() == 0.0078125
    assert hn.quantize(x, "nvfp4")[16].item() == 0.0


def test_per_tensor_fp8():
    # amax 448 -> scale 448 / 448 = 1: values land on the E4M3 grid directly; 17 ties to 16.
    x = torch.tensor([448.0, 17.0, -19.0, 0.001])
    # 0.001 / 2^-9 (the smallest E4M3 subnormal) = 0.51 -> 1 quantum.
    assert hn.quantize(x, "fp8_e4m3").tolist() == [448.0, 16.0, -20.0, 2.0**-9]
    # amax 57344 -> scale 1 for E5M2; 45056 ties to 49152.
    x = torch.tensor([57344.0, 45056.0])
    assert hn.quantize(x, "fp8_e5m2").tolist() == [57344.0, 49152.0]


def test_bf16_and_fp16_casts():
    x = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 * 0.99, 3.0e38])
    # rne: 1 + 2^-8 is the midpoint of 1 and 1 + 2^-7 -> 1 (even); 1 + 3*2^-8 -> 1 + 2^-6 (even)
    assert hn.quantize(x, "bf16")[:3].tolist() == [1.0, 1 + 2.0**-6, 1.0]
    assert torch.equal(hn.quantize(x, "bf16"), x.to(torch.bfloat16).float())
    assert hn.quantize(x, "bf16", rounding="half_away")[:2].tolist() == [1 + 2.0**-7, 1 + 2.0**-6]
    assert hn.quantize(x, "bf16", rounding="toward_zero")[:3].tolist() == [1.0, 1 + 2.0**-7, 1.0]
    y = hn.quantize(torch.tensor([65520.0, 65519.0, 2.0**-25]), "fp16")
    assert y.tolist() == [math.inf, 65504.0, 0.0]  # IEEE: overflow to inf; 2^-25 ties to 0


def test_2d_tiles_share_one_scale():
    # A 32x32 tile shares one scale: amax 96 -> s = floor(log2 96) - 2 = 4, and 3 / 16 = 0.19
    # rounds to 0 anywhere in that tile; the next tile (amax 3, s = -1) keeps its 3s.
    x = torch.full((32, 64), 3.0)
    x[5, 7] = 96.0
    y = hn.quantize(x, "mxfp4_2d")
    assert y[5, 7].item() == 96.0
    assert (y[:, :32].flatten()[torch.arange(1024) != 5 * 32 + 7] == 0).all()  # 3 / 16 -> 0
    assert (y[:, 32:] == 3.0).all()


def test_registry_specs():
    assert get("mxfp8").element == get("mxfp8_e4m3").element and get("mxfp8").alias_of == "mxfp8_e4m3"
    assert get("mxfp4").bits_per_value == 4 + 8 / 32
    assert get("nvfp4").bits_per_value == 4 + 8 / 16
    assert get("mxfp4_2d").block == (32, 32)
    assert get("mxfp4_sr").rounding == "stochastic"
    assert get("mxfp4:rceil").scale_mode == "rceil"
    assert get("nvfp4:torchao").flavor == "torchao"
    names = hn.formats.names()
    for n in ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "nvfp4", "hif4",
              "fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "mxfp8", "mxfp4_2d", "mxfp4_sr"]:
        assert n in names
    with pytest.raises(Exception):
        get("mxfp4").name = "x"  # frozen
