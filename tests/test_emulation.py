"""Emulation: spec strings, exact restore, keyed replay, grad paths (tiny Llama built in the test)."""

from __future__ import annotations

import math

import pytest
import torch

import hwnoise as hn
from hwnoise.emulation import Emulation
from test_inject_models import bit_identical, snapshot, tiny_llama, tokens


@pytest.fixture
def model():
    m = tiny_llama(layers=2)
    m.eval()
    return m


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- specs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, fields", [
    ("clean", {}),
    ("relative:0.05", {"error": "relative:0.05", "where": "ops"}),
    ("absolute:1e-3@input", {"error": "absolute:1e-3", "where": "input"}),
    ("weights:nvfp4", {"weight_format": "nvfp4"}),
    ("inputs:mxfp4", {"input_format": "mxfp4"}),
    ("aqn:0.02", {"aqn_sigma": 0.02}),
    ("weights:mxfp4:rceil + relative:0.1@output + aqn:0.01",
     {"weight_format": "mxfp4:rceil", "error": "relative:0.1", "where": "output", "aqn_sigma": 0.01}),
])
def test_parse_sets_exactly_the_named_fields(spec, fields):
    e = Emulation.parse(spec)
    assert e == Emulation(**fields)
    assert e.is_clean == (not fields)
    assert Emulation.parse(e.spec) == e  # the canonical spec names the same condition
    assert Emulation.from_dict(e.to_dict()) == e


def test_scale_is_the_error_models_scale():
    assert Emulation.parse("relative:0.2@ops").scale == 0.2
    assert Emulation.parse("weights:mxfp4").scale is None


@pytest.mark.parametrize("spec, words", [
    ("bogus:1", ["'bogus:1'", "weights:FMT", "relative"]),
    ("relative:0.05@nowhere", ["'nowhere'", "ops, input, output, weight"]),
    ("weights:fp5", ["'fp5'", "mxfp4"]),
    ("aqn:x", ["'x'", "aqn:0.01"]),
    ("aqn:-1", ["aqn_sigma", "-1"]),
    ("relative:0.05+absolute:0.1", ["error twice"]),
    ("weights:", ["'weights:'"]),
    ("", ["bad emulation spec"]),
])
def test_bad_specs_name_the_value_and_what_is_accepted(spec, words):
    with pytest.raises(ValueError) as info:
        Emulation.parse(spec)
    for word in words:
        assert word in str(info.value)


# -- applying --------------------------------------------------------------------------------

def test_weight_format_swaps_quantized_weights_and_puts_the_originals_back(model):
    before = snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    seen = {}

    def record(module, args, name):
        seen[name] = module.weight.detach().clone()

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: record(mod, args, n))
               for n, m in model.named_modules() if n.endswith("q_proj") or n.endswith("down_proj")]
    with Emulation(weight_format="mxfp4").applied(model) as stats:
        _logits(model, tokens())
    for h in handles:
        h.remove()
    assert len(seen) == 4
    for name, w in seen.items():
        assert torch.equal(w, hn.quantize(before[name + ".weight"], "mxfp4")), name
    assert stats.as_dict()["weights_quantized"] == 14  # 7 linears x 2 layers; lm_head left alone
    assert math.isfinite(stats.weight_sqnr_db) and stats.weight_sqnr_db > 5
    assert bit_identical(before, snapshot(model))
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects


def test_everything_is_restored_when_the_block_raises(model):
    before = snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    e = Emulation.parse("weights:nvfp4+inputs:mxfp4+relative:0.05@output+aqn:0.05")
    with pytest.raises(RuntimeError, match="boom"):
        with e.applied(model, seed=1, step=2):
            _logits(model, tokens())
            raise RuntimeError("boom")
    assert bit_identical(before, snapshot(model))
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(_logits(model, tokens()), _logits(tiny_llama(layers=2).eval(), tokens()))


@pytest.mark.parametrize("spec", ["relative:0.05@ops", "relative:0.05@output", "aqn:0.05",
                                  "inputs:mxfp4:rounding=stochastic"])
def test_same_seed_and_step_replay_the_same_noise(model, spec):
    e, ids = Emulation.parse(spec), tokens()
    clean = _logits(model, ids)
    runs = {}
    for key in [(0, 0), (0, 0), (0, 1), (1, 0)]:
        with e.applied(model, seed=key[0], step=key[1]):
            runs.setdefault(key, []).append(_logits(model, ids))
    assert torch.equal(runs[(0, 0)][0], runs[(0, 0)][1])
    assert not torch.equal(runs[(0, 0)][0], clean)
    assert not torch.equal(runs[(0, 0)][0], runs[(0, 1)][0])
    assert not torch.equal(runs[(0, 0)][0], runs[(1, 0)][0])


def test_replay_does_not_depend_on_what_ran_before(model):
    e, ids = Emulation.parse("relative:0.05@ops"), tokens()
    with e.applied(model, seed=3, step=5):
        first = _logits(model, ids)
    with e.applied(model, seed=3, step=4):
        _logits(model, ids)
        _logits(model, ids)
    with e.applied(model, seed=3, step=5):
        again = _logits(model, ids)
    assert torch.equal(first, again)


def test_aqn_noise_has_the_requested_std_on_the_norm_weights(model):
    big = tiny_llama(layers=2)
    norms = {n: p.detach().clone() for n, p in big.named_parameters() if "norm" in n}
    noisy = {}
    with Emulation(aqn_sigma=0.05).applied(big, seed=0, step=0):
        for n in norms:
            noisy[n] = big.get_parameter(n).detach().clone()
    diff = torch.cat([(noisy[n] - norms[n]).flatten() for n in norms])
    assert diff.numel() == 5 * 32
    assert 0.04 < float(diff.std()) < 0.06  # 160 draws: the std is within 12 % with high probability
    assert all(torch.equal(big.get_parameter(n), norms[n]) for n in norms)


def test_grad_true_quantizes_forward_and_passes_gradients_to_the_clean_weights(model):
    ids = tokens()
    e = Emulation(weight_format="mxfp4")
    with e.applied(model):
        ref = _logits(model, ids)
    model.zero_grad()
    with e.applied(model, grad=True):
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits.detach(), ref, rtol=0, atol=1e-5)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_op_noise_reaches_the_backward_only_with_grad(model):
    ids = tokens()
    e = Emulation.parse("relative:0.1@ops")

    def grads(grad: bool):
        model.zero_grad()
        with e.applied(model, seed=0, step=0, grad=grad):
            model(input_ids=ids, labels=ids).loss.backward()
        return model.model.layers[0].mlp.up_proj.weight.grad.clone()

    assert not torch.equal(grads(True), grads(False))
    assert torch.equal(grads(False), grads(False))


def test_bad_seed_and_step(model):
    with pytest.raises(ValueError, match="seed"):
        with Emulation().applied(model, seed=1.5):
            pass
    with pytest.raises(ValueError, match="step"):
        with Emulation().applied(model, step=-1):
            pass


def test_substeps_of_one_step_draw_their_own_noise(model):
    e, ids = Emulation.parse("relative:0.05@ops"), tokens()
    out = {}
    for sub in (0, 1, 1):
        with e.applied(model, seed=0, step=2, substep=sub):
            out.setdefault(sub, []).append(_logits(model, ids))
    with e.applied(model, seed=0, step=2):
        default = _logits(model, ids)
    assert torch.equal(out[0][0], default)  # substep 0 is the plain (seed, step) block
    assert torch.equal(out[1][0], out[1][1])
    assert not torch.equal(out[0][0], out[1][0])
    with pytest.raises(ValueError, match="substep"):
        with e.applied(model, substep=-1):
            pass


# -- one home: hwnoise.emulation (no old names before a first release) --------------------------

@pytest.mark.parametrize("name", ["Emulation", "EmulationStats", "EMULATION_WHERE"])
def test_emulation_names_live_only_in_hwnoise_emulation(name):
    import importlib
    import sys

    import hwnoise.emulation

    assert hasattr(hwnoise.emulation, name)
    with pytest.raises(AttributeError):
        getattr(sys.modules["hwnoise.inject"], name)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hwnoise.inject.emulation")
