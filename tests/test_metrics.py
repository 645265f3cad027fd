"""hwnoise.metrics against hand computations on small hand-made tensors."""

from __future__ import annotations

import math
import re

import pytest
import torch

import hwnoise
from hwnoise import metrics
from hwnoise.metrics import deadzone_ratio, mse, relative_error, saturation_ratio, sqnr_db

T = torch.tensor


# --------------------------------------------------------------------------------------------
# sqnr_db
# --------------------------------------------------------------------------------------------


def test_sqnr_hand_computed():
    # signal 3^2 + 4^2 = 25, noise 0^2 + 1^2 = 1.
    assert sqnr_db(T([3.0, 4.0]), T([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0), rel=1e-12)
    # signal 1 + 4 + 4 = 9, noise 0.5^2 = 0.25 -> 10 log10(36).
    assert sqnr_db(T([[1.0, -2.0], [2.0, 0.0]]), T([[1.0, -2.0], [1.5, 0.0]])) == pytest.approx(
        10 * math.log10(36.0), rel=1e-12)
    # Noise larger than the signal: negative dB. signal 1, noise 4 -> 10 log10(1/4).
    assert sqnr_db(T([1.0]), T([-1.0])) == pytest.approx(10 * math.log10(0.25), rel=1e-12)


def test_sqnr_special_values():
    assert sqnr_db(T([3.0, 4.0]), T([3.0, 4.0])) == math.inf
    assert sqnr_db(T([0.0, 0.0]), T([0.0, 0.0])) == math.inf  # no noise at all
    assert sqnr_db(T([0.0, 0.0]), T([0.0, 1.0])) == -math.inf  # noise without signal


def test_sqnr_computed_in_float64():
    # fp32 squares of 1e30 overflow; the metric works in float64: signal 2e60, noise 1e60 -> 10 log10(2).
    x = T([1e30, 1e30])
    assert sqnr_db(x, T([1e30, 0.0])) == pytest.approx(10 * math.log10(2.0), rel=1e-6)
    # bf16 / fp16 inputs and mixed dtypes.
    assert sqnr_db(T([3.0, 4.0], dtype=torch.bfloat16), T([3.0, 3.0], dtype=torch.float16)) == pytest.approx(
        10 * math.log10(25.0), rel=1e-12)


# --------------------------------------------------------------------------------------------
# mse, relative_error
# --------------------------------------------------------------------------------------------


def test_mse_hand_computed():
    assert mse(T([3.0, 4.0]), T([3.0, 3.0])) == 0.5  # (0 + 1) / 2
    assert mse(T([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 2)) == 3.5  # (0 + 1 + 4 + 9) / 4
    assert mse(T([0.1]), T([0.1])) == 0.0
    assert mse(torch.empty(0), torch.empty(0)) == 0.0
    # float64: (1e30)^2 / 2, not inf.
    assert mse(T([1e30, 0.0]), T([0.0, 0.0])) == pytest.approx(float(torch.tensor(1e30).double()) ** 2 / 2, rel=1e-12)


def test_relative_error_hand_computed():
    # Over the nonzero entries of x only: |2-1|/2 = 0.5, |-4+4|/4 = 0, |8-10|/8 = 0.25; the x = 0
    # entry (x_hat = 5) is excluded. Mean of three: 0.25.
    assert relative_error(T([2.0, -4.0, 0.0, 8.0]), T([1.0, -4.0, 5.0, 10.0])) == pytest.approx(0.25, rel=1e-12)
    assert relative_error(T([0.0, 0.0]), T([1.0, 2.0])) == 0.0  # no nonzero x: nothing to average
    assert relative_error(T([-2.0]), T([2.0])) == 2.0  # sign flip: |(-2) - 2| / 2


# --------------------------------------------------------------------------------------------
# deadzone_ratio
# --------------------------------------------------------------------------------------------


def test_deadzone_ratio_hand_computed():
    # 8 nonzero entries in x; x_hat flushes two of them (1.0 and 4.0), so 2/8. The two zeros of x
    # are not in the denominator, and a zero x whose x_hat is nonzero does not count either.
    x = T([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, -5.0, 6.0, 7.0, 8.0])
    x_hat = T([0.0, 9.0, 0.0, 2.0, 3.0, -0.0, -5.0, 6.0, 7.0, 8.0])
    assert deadzone_ratio(x, x_hat) == 0.25
    assert deadzone_ratio(torch.zeros(5), torch.zeros(5)) == 0.0
    assert deadzone_ratio(T([1.0, -1.0]), T([0.0, -0.0])) == 1.0


def test_deadzone_ratio_of_mxfp4():
    # One MXFP4 block, amax 6 -> s = floor(log2 6) - 2 = 0: element grid 0, 0.5, 1, ... with the
    # tie 0.25 going to 0 (even). 0.2 and -0.25 flush to zero, 0.3 rounds to 0.5: 2 of 8 nonzero.
    x = torch.zeros(32)
    x[:8] = T([6.0, 0.2, -0.25, 0.3, 1.0, 2.0, 3.0, -4.0])
    y = hwnoise.quantize(x, "mxfp4")
    assert y[:8].tolist() == [6.0, 0.0, -0.0, 0.5, 1.0, 2.0, 3.0, -4.0]
    assert deadzone_ratio(x, y) == 0.25


# --------------------------------------------------------------------------------------------
# saturation_ratio
# --------------------------------------------------------------------------------------------


def _mxfp4_blocks() -> tuple[torch.Tensor, int]:
    """Three MXFP4 blocks with hand-computed scales (floor rule s = floor(log2 amax) - 2, limit 6 * 2^s)."""
    x = torch.zeros(3, 32)
    # amax 7: s = 2 - 2 = 0, limit 6. Beyond it: 7, 6.5, 6.25, -6.5 (6 itself is representable): 4.
    x[0, :7] = T([7.0, 6.5, 6.25, 6.0, -6.5, 5.0, 1.0])
    # amax 60: s = 5 - 2 = 3, limit 48. Beyond: 60, -50, 49 (48 and 47 are not): 3.
    x[1, :6] = T([60.0, -50.0, 49.0, 48.0, 47.0, 10.0])
    # amax 8: s = 3 - 2 = 1, limit 12: nothing beyond.
    x[2, :3] = T([8.0, -7.9, 0.1])
    return x, 4 + 3


def test_saturation_ratio_mxfp4_hand_count():
    x, n_sat = _mxfp4_blocks()
    y = hwnoise.quantize(x, "mxfp4")
    assert saturation_ratio(x, y, "mxfp4") == n_sat / x.numel()  # 7 / 96
    # The saturated entries are exactly those clipped to +-6 * 2^s by quantize.
    limits = T([6.0, 48.0, 12.0])[:, None].expand_as(x)
    sat = x.abs() > limits
    assert int(sat.sum()) == n_sat
    assert torch.equal(y[sat].abs(), limits[sat])
    # Same blocks along axis 0 of the transposed tensor.
    assert saturation_ratio(x.T, y.T, "mxfp4", axis=0) == n_sat / x.numel()


def test_saturation_ratio_follows_scale_mode():
    x, n_sat = _mxfp4_blocks()
    # ceil: s = ceil(log2 amax) - 2 -> limits 12, 96, 12 (amax / 2^s <= 4 < 6): nothing saturates,
    # where floor saturated 7 of 96. The option reaches the mask both as a keyword and in the spec.
    y = hwnoise.quantize(x, "mxfp4", scale_mode="ceil")
    assert saturation_ratio(x, y, "mxfp4", scale_mode="ceil") == 0.0
    assert saturation_ratio(x, y, "mxfp4:ceil") == 0.0
    assert saturation_ratio(x, y, "mxfp4", scale_mode="floor") == n_sat / 96


def test_saturation_ratio_nvfp4_hand_count():
    # Tensor amax 2688 -> S_enc = 2688 / 2688 = 1. Block 2 max 100: s_b = e4m3(100 / 6 = 16.67) = 16,
    # limit 6 * 16 = 96. Beyond: 100, 97, 96.5, -99, -100 (95 is not): 5 of 32. Block 1 (2688)
    # sits exactly at its limit 6 * 448.
    x = torch.zeros(32)
    x[0] = 2688.0
    x[16:24] = T([100.0, 97.0, 96.5, 95.0, -99.0, 10.0, 1.0, -100.0])
    y = hwnoise.quantize(x, "nvfp4")
    assert y[0].item() == 2688.0 and y[16].item() == 96.0
    assert saturation_ratio(x, y, "nvfp4") == 5 / 32


def test_saturation_ratio_casts_and_per_tensor():
    x = T([70000.0, -65505.0, 65504.0, 1.0])
    assert saturation_ratio(x, hwnoise.quantize(x, "fp16"), "fp16") == 2 / 4  # beyond fp16's 65504
    assert saturation_ratio(x, hwnoise.quantize(x, "bf16"), "bf16") == 0.0
    # Per-tensor scaling maps the amax onto the element maximum: nothing saturates.
    assert saturation_ratio(x, hwnoise.quantize(x, "fp8_e4m3"), "fp8_e4m3") == 0.0


def test_saturation_ratio_without_format():
    # Counts |x| > max |x_hat| = 2.5: 3.0 and -4.0.
    x = T([3.0, -4.0, 2.5, 1.0])
    x_hat = T([2.5, -2.5, 2.5, 1.0])
    assert saturation_ratio(x, x_hat) == 2 / 4
    assert saturation_ratio(torch.empty(0), torch.empty(0)) == 0.0


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [sqnr_db, mse, relative_error, deadzone_ratio, saturation_ratio])
@pytest.mark.parametrize("a, b", [((3,), (4,)), ((2, 3), (3, 2)), ((3,), (1, 3)), ((2, 1), (2, 2))])
def test_shape_mismatch(fn, a, b):
    with pytest.raises(ValueError, match=rf"same shape, got {re.escape(str(a))} and {re.escape(str(b))}"):
        fn(torch.zeros(a), torch.zeros(b))


def test_metrics_ignore_autograd():
    x = T([3.0, 4.0], requires_grad=True)
    assert sqnr_db(x, T([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    assert isinstance(mse(x, x * 0), float)


def test_error_summary_matches_single_metrics():
    x = T([2.0, -4.0, 0.0, 8.0, 1.0])
    x_hat = T([1.0, -4.0, 5.0, 10.0, 0.0])
    s = metrics.error_summary(x, x_hat)
    assert s["sqnr_db"] == pytest.approx(sqnr_db(x, x_hat), rel=1e-12)
    assert s["mse"] == pytest.approx(mse(x, x_hat), rel=1e-12)
    assert s["relative_error"] == pytest.approx(relative_error(x, x_hat), rel=1e-12)
    assert s["deadzone_ratio"] == deadzone_ratio(x, x_hat) == 0.25
    assert s["signal"] == 4 + 16 + 64 + 1 and s["noise"] == 1 + 0 + 25 + 4 + 1
