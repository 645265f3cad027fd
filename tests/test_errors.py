"""Tests for hwnoise.errors: the error models, their keys, names and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from hwnoise import errors
from hwnoise.errors import (
    AbsoluteGaussian, Quantize, RelativeGaussian, SystematicBias, Truncation, noise_key,
)


def _x(n=200_000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_relative_gaussian_is_x_plus_eps_abs_x_scale():
    x = _x()
    key = noise_key(0, "site", "forward", 0)
    y = RelativeGaussian(0.05).apply(x, key)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(key))
    # eps * |x| is computed as (eps * sign(x)) * |x| = eps * x: the same i.i.d. N(0, 1) draws
    torch.testing.assert_close(y, x + (eps * torch.sign(x)) * x.abs() * 0.05, rtol=0, atol=1e-6)
    signed = (eps * torch.sign(x))[x != 0]
    assert abs(float(signed.mean())) < 0.01 and abs(float(signed.std()) - 1) < 0.01
    rel = float((y - x).norm() / x.norm())
    assert abs(rel - 0.05) < 0.05 * 0.02  # 200k draws: the ratio is tight


def test_apply_is_differentiable_on_tensors_that_need_grad():
    w = torch.randn(8, 8, requires_grad=True)
    for model in (RelativeGaussian(0.1), AbsoluteGaussian(0.1), SystematicBias(0.1)):
        model.apply(w, 3).sum().backward()
        assert w.grad is not None
        w.grad = None


def test_absolute_gaussian_std_and_zero_stays_noisy():
    x = torch.zeros(100_000)
    y = AbsoluteGaussian(0.01).apply(x, 7)
    assert abs(float(y.std()) - 0.01) < 0.0002 and abs(float(y.mean())) < 0.0002


def test_systematic_bias_grows_every_magnitude():
    x = torch.tensor([-2.0, -0.5, 0.0, 1.0, 4.0])
    y = SystematicBias(0.1).apply(x, 0)
    torch.testing.assert_close(y, x + torch.sign(x) * x.abs() * 0.1)
    assert torch.equal(y.abs() >= x.abs(), torch.ones(5, dtype=torch.bool))


def test_truncation_toward_zero_mantissa_and_step():
    x = torch.tensor([1.0 + 2**-8 + 2**-9, -(1.0 + 2**-8 + 2**-9), 3.999, -0.3, float("inf"), float("nan")])
    y = Truncation(mbits=7).apply(x, 0)  # bf16's 7 mantissa bits, truncated rather than rounded
    assert y[0] == 1.0 and y[1] == -1.0  # 1 + 3/512 keeps no bit below 2^-7: toward zero, both signs
    assert y[2] == 3.984375  # 3.999 = 1.9995 x 2 -> 1.1111111b x 2, never rounded up to 4
    assert y[4] == float("inf") and math.isnan(float(y[5]))
    x = _x(10_000)
    t = Truncation(mbits=3).apply(x, 0)
    assert torch.all(t.abs() <= x.abs()) and torch.all(torch.sign(t) * torch.sign(x) >= 0)
    s = Truncation(step=0.25).apply(torch.tensor([0.6, -0.6, 0.24, 1.0]), 0)
    assert s.tolist() == [0.5, -0.5, 0.0, 1.0]


def test_truncation_mbits7_matches_bf16_round_toward_zero():
    x = _x(50_000)
    t = Truncation(mbits=7).apply(x, 0)
    bf = x.to(torch.bfloat16).float()  # round to nearest: differs from truncation only by one ulp
    assert torch.all(t.abs() <= x.abs())
    assert torch.all((bf - t).abs() <= bf.abs() * 2**-7)
    assert torch.equal(t.to(torch.bfloat16).float(), t)  # on the bf16 grid


def test_quantize_uses_hwnoise_quantize_and_keys_stochastic_rounding():
    from hwnoise import quantize

    x = _x(4096)
    assert torch.equal(Quantize("mxfp4").apply(x, 1), quantize(x, "mxfp4"))
    q = Quantize("mxfp4", rounding="stochastic")
    assert torch.equal(q.apply(x, 5), q.apply(x, 5)) and not torch.equal(q.apply(x, 5), q.apply(x, 6))
    assert "mxfp4" in repr(q) and q == Quantize("mxfp4", rounding="stochastic")


def test_models_are_frozen_and_keep_dtype():
    model = RelativeGaussian(0.1)
    with pytest.raises(Exception):
        model.scale = 0.2  # frozen
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = _x(1000).to(dtype)
        for m in (RelativeGaussian(0.1), AbsoluteGaussian(0.1), SystematicBias(0.1), Truncation(mbits=4)):
            assert m.apply(x, 3).dtype == dtype


def test_keys_depend_on_every_field_only():
    base = noise_key(0, "model.layers.0.mlp", "forward", 0)
    assert base == noise_key(0, "model.layers.0.mlp", "forward", 0)
    others = {noise_key(1, "model.layers.0.mlp", "forward", 0), noise_key(0, "model.layers.1.mlp", "forward", 0),
              noise_key(0, "model.layers.0.mlp", "grad_input", 0), noise_key(0, "model.layers.0.mlp", "forward", 1)}
    assert base not in others and len(others) == 4
    x = _x(1000)
    assert torch.equal(RelativeGaussian(0.1).apply(x, base), RelativeGaussian(0.1).apply(x, base))


def test_get_and_parse():
    assert errors.get("relative", 0.05) == RelativeGaussian(0.05)
    assert errors.get("absolute", 1e-3) == AbsoluteGaussian(1e-3)
    assert errors.get("bias", 0.01) == SystematicBias(0.01)
    assert errors.get("truncation", 7) == Truncation(mbits=7)
    assert errors.get("truncation", 0.5) == Truncation(step=0.5)
    assert errors.parse("relative:0.05") == RelativeGaussian(0.05)
    assert errors.parse("relative", 0.1) == RelativeGaussian(0.1)
    assert errors.parse("truncation:mbits=7") == Truncation(mbits=7)
    assert errors.parse("truncation:step=0.01") == Truncation(step=0.01)
    assert errors.parse("quantize:nvfp4,rounding=stochastic") == Quantize("nvfp4", rounding="stochastic")
    assert errors.names() == ["relative", "absolute", "bias", "truncation", "quantize"]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_scale_names_value(bad):
    for cls in (RelativeGaussian, AbsoluteGaussian, SystematicBias):
        with pytest.raises(ValueError, match=r"scale must be"):
            cls(bad)


def test_bad_names_and_specs():
    with pytest.raises(ValueError, match=r"unknown error model 'gaussian'; known: relative, absolute, bias"):
        errors.get("gaussian", 0.1)
    with pytest.raises(ValueError, match="needs a scale"):
        errors.get("relative")
    with pytest.raises(ValueError, match=r"bad scale in 'relative:abc'"):
        errors.parse("relative:abc")
    with pytest.raises(ValueError, match="exactly one of mbits or step"):
        Truncation()
    with pytest.raises(ValueError, match="mbits must be an integer in 0..23"):
        Truncation(mbits=30)
    with pytest.raises(ValueError, match="step must be"):
        Truncation(step=-1.0)
    with pytest.raises(ValueError, match="mxfp5"):
        Quantize("mxfp5")
    with pytest.raises(ValueError, match="role"):
        noise_key(0, "a", "backward", 0)
