"""Module-level injection: hooks on input / output / weight, reversibility, stats, phases, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwnoise as hn
from hwnoise.errors import AbsoluteGaussian, Quantize, RelativeGaussian, Truncation, noise_key
from test_inject_models import bit_identical, snapshot, tiny_llama, tiny_mixtral, tokens

ERRORS = [RelativeGaussian(0.05), AbsoluteGaussian(0.01), Truncation(mbits=3), Quantize("mxfp4")]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


# --- 1. reversibility ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["input", "output", "weight"])
@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_state_dict_bit_identical_after_every_mode(where, error):
    model = tiny_llama()
    before = snapshot(model)
    params_before = {n: p for n, p in model.named_parameters()}
    with hn.inject(model, error, where=where, targets="linear") as handle:
        _loss(model, tokens()).backward()
        assert bit_identical(snapshot(model), before)  # nothing written even while active
    assert not handle.active
    assert bit_identical(snapshot(model), before)
    assert {n: p for n, p in model.named_parameters()} == params_before  # the same Parameter objects
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("where", ["input", "output", "weight"])
def test_state_dict_bit_identical_after_exception_in_forward(where):
    model = tiny_llama()
    before = snapshot(model)
    weight = model.model.layers[0].mlp.down_proj.weight
    handle = hn.inject(model, RelativeGaussian(0.1), where=where, targets="linear")
    with pytest.raises(RuntimeError):
        model.model.layers[0].mlp.down_proj(torch.randn(3, 5))  # wrong width: F.linear raises inside forward
    # The weight is back at once (the always-called hook), before remove():
    assert model.model.layers[0].mlp.down_proj._parameters["weight"] is weight
    assert bit_identical(snapshot(model), before)
    _loss(model, tokens()).backward()  # still usable
    handle.remove()
    assert bit_identical(snapshot(model), before)


def test_remove_restores_weight_of_a_forward_that_never_finished():
    model = tiny_llama(1)
    proj = model.model.layers[0].self_attn.q_proj
    weight = proj.weight
    handle = hn.inject(model, RelativeGaussian(0.1), where="weight", targets="*.q_proj")
    handle._weight_pre_hook(handle._sites["model.layers.0.self_attn.q_proj"])(proj, ())  # as if forward stopped
    assert proj._parameters["weight"] is not weight
    handle.remove()
    assert proj._parameters["weight"] is weight and handle.remove() is None  # idempotent


# --- weight mode: straight-through gradients -------------------------------------------------------


def test_weight_noise_gradient_is_straight_through():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    error = RelativeGaussian(0.1)
    with hn.inject(model, error, where="weight", targets="linear", seed=3):
        model(x).pow(2).sum().backward()
    # Reference: the same noisy weights as leaves; their gradients are what the parameters got.
    w0 = error.apply(model[0].weight.detach(), noise_key(3, "0", "forward", 0)).requires_grad_()
    w2 = error.apply(model[2].weight.detach(), noise_key(3, "2", "forward", 0)).requires_grad_()
    out = F.linear(torch.tanh(F.linear(x, w0, model[0].bias.detach())), w2, model[2].bias.detach())
    out.pow(2).sum().backward()
    assert torch.equal(model[0].weight.grad, w0.grad) and torch.equal(model[2].weight.grad, w2.grad)
    assert not torch.equal(w0, model[0].weight)


def test_weight_noise_quantize_is_w4a16():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    x = torch.randn(3, 64)
    model = nn.Sequential(lin)
    with hn.inject(model, Quantize("mxfp4"), where="weight", targets="linear"):
        y = model(x)
    torch.testing.assert_close(y, F.linear(x, hn.quantize(lin.weight.detach(), "mxfp4"), lin.bias), rtol=0, atol=1e-6)


# --- 3. measured error, stats ----------------------------------------------------------------------


def test_measured_relative_output_error_matches_request():
    model = tiny_llama()
    with torch.no_grad(), hn.inject(model, RelativeGaussian(0.05), where="output", targets="linear") as handle:
        for seed in range(3):
            model(input_ids=tokens(4, 16, seed))
    stats = handle.stats()
    assert len(stats) == 14 and all(s.calls == 3 for s in stats.values())
    for name, s in stats.items():
        assert abs(s.relative_error - 0.05) <= 0.005, (name, s)


def test_stats_measure_what_the_model_sees():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64))
    x = torch.randn(16, 32)
    clean = model(x).detach()
    with hn.inject(model, RelativeGaussian(0.2), where="output") as handle:
        noisy = model(x).detach()
    measured = float((noisy - clean).norm() / clean.norm())
    assert handle.stats()["0"].relative_error == pytest.approx(measured, rel=1e-5)


# --- 4. determinism and independence -----------------------------------------------------------------


def _noisy_run(model, where, seed):
    model.zero_grad()
    with hn.inject(model, RelativeGaussian(0.05), where=where, seed=seed):
        loss = _loss(model, tokens())
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("where", ["input", "output", "weight"])
def test_same_seed_same_bits_other_seed_other_bits(where):
    model = tiny_llama()
    a, ga = _noisy_run(model, where, 0)
    b, gb = _noisy_run(model, where, 0)
    c, _ = _noisy_run(model, where, 1)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not torch.equal(a, c)


def test_sites_and_steps_draw_uncorrelated_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    x = torch.randn(64, 256)
    eps = {}

    def record(name):
        def hook(module, args, output):
            eps.setdefault(name, []).append(output.detach())
        return hook

    clean = [model[0](x).detach(), model[1](x).detach()]
    with hn.inject(model, RelativeGaussian(0.05), where="output"):
        for _ in range(2):
            outs = [model[0](x).detach(), model[1](x).detach()]
            for i in range(2):
                eps.setdefault(i, []).append(((outs[i] - clean[i]) / (0.05 * clean[i])).flatten())
    draws = [eps[0][0], eps[1][0], eps[0][1]]  # site 0 step 0, site 1 step 0, site 0 step 1
    for i in range(3):
        assert abs(float(draws[i].std()) - 1) < 0.02
        for j in range(i + 1, 3):
            corr = float(torch.corrcoef(torch.stack([draws[i], draws[j]]))[0, 1])
            assert abs(corr) < 0.05, (i, j, corr)


# --- phases ----------------------------------------------------------------------------------------


def test_phases_switch_injections():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(4, 8)
    clean = model(x)
    with hn.inject(model, RelativeGaussian(0.5), phase="rollout") as handle:
        assert torch.equal(model(x), clean)  # no phase declared: rollout-only noise is off
        with hn.phase("training"):
            assert torch.equal(model(x), clean)
        with hn.phase("rollout"):
            assert not torch.equal(model(x), clean)
            with hn.phase("training"):
                assert torch.equal(model(x), clean)
    assert handle.stats()["0"].calls == 1
    with hn.inject(model, RelativeGaussian(0.5), phase="both"), hn.phase("training"):
        assert not torch.equal(model(x), clean)
    assert hn.inject.__module__ == "hwnoise.inject.hooks"


# --- selection: blocks and MoE ---------------------------------------------------------------------------


def test_attention_mlp_and_moe_blocks():
    model = tiny_mixtral()
    before = snapshot(model)
    ids = tokens()
    clean = model(input_ids=ids).logits
    for targets in ("attention", "mlp", "experts", "linear"):
        with hn.inject(model, RelativeGaussian(0.1), where="output", targets=targets) as handle:
            noisy = model(input_ids=ids, labels=ids)
            noisy.loss.backward()
        assert not torch.equal(noisy.logits, clean), targets
        assert all(s.calls == 1 for s in handle.stats().values())
    assert bit_identical(snapshot(model), before)
    with hn.inject(model, RelativeGaussian(0.1), where="input", targets="experts") as handle:
        model(input_ids=ids)
    assert list(handle.stats()) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


# --- 7. bad input ----------------------------------------------------------------------------------


def test_bad_input_errors():
    model = tiny_llama(1)
    with pytest.raises(ValueError, match=r"unknown where 'weights'; known: input, output, weight"):
        hn.inject(model, RelativeGaussian(0.1), where="weights")
    with pytest.raises(ValueError, match=r"unknown phase 'eval'; known: rollout, training, both"):
        hn.inject(model, RelativeGaussian(0.1), phase="eval")
    with pytest.raises(ValueError, match=r"target 'lienar' matched no module.*model.layers.0"):
        hn.inject(model, RelativeGaussian(0.1), targets="lienar")
    with pytest.raises(ValueError, match="unknown error model 'gauss'"):
        hn.inject(model, "gauss")
    with pytest.raises(ValueError, match="needs a scale"):
        hn.inject(model, "relative")
    with pytest.raises(ValueError, match="scale must be finite and >= 0"):
        hn.inject(model, RelativeGaussian(-0.1))
    with pytest.raises(ValueError, match="weight parameter"):
        hn.inject(model, RelativeGaussian(0.1), where="weight", targets="attention")
    with pytest.raises(ValueError, match="unknown phase 'both'"):
        with hn.phase("both"):
            pass
    with pytest.raises(ValueError, match="seed must be an integer"):
        hn.inject(model, RelativeGaussian(0.1), seed="0")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
