"""Tests for hwnoise.aqn: schedules against the formula, noise that lands in bf16, exact restore,
reproducible draws, multipliers and targeting, and clear errors (issue 4, "It must show" 1-5).

Fast tests use tiny Llama models built here; tests marked ``slow`` load the bundled SmolLM2-135M
once per module.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from fractions import Fraction

import pytest
import torch

import hwnoise
from hwnoise.aqn import AQN, Constant, EpochAwareDecay, LayerMultipliers, StagedDecay
from hwnoise.select import decoder_layer_index

# --- helpers -------------------------------------------------------------------------------

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _tiny_llama(hidden: int = 64, layers: int = 3, dtype=torch.float32, norm_range=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if norm_range is not None:  # trained norms are not all exactly 1.0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(*norm_range)
    return model.to(dtype)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INT_VIEW.get(a.dtype)
    return torch.equal(a.view(view), b.view(view)) if view else torch.equal(a, b)


def _changed(model, snapshot) -> list[str]:
    return [k for k, v in model.state_dict().items() if not _bit_equal(v, snapshot[k])]


def _norm_weights(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}


# --- 1. schedules equal the formula -----------------------------------------------------------


def _reference_staged(t: int, T: int, K: int, s0: float, s1: float) -> float:
    """Straight from the formula text; the interval in exact arithmetic (T / K is not exact in floats)."""
    trend = [s0 * (s1 / s0) ** (i / (K - 2)) if K > 2 else s0 for i in range(K - 1)]  # i = 0 .. K-2
    j = math.floor(Fraction(min(t, T)) / Fraction(T, K))
    return 0.0 if j == 0 else trend[min(j - 1, K - 2)]


def _reference_epoch_aware(t: int, T: int, K: int, s0: float, s1: float, spe: int) -> float:
    E = math.ceil(T / spe)
    bounds = [(e, e * spe, min((e + 1) * spe, T)) for e in range(E)]
    t = min(t, T)
    for e, start, end in bounds:
        if start <= t < end or (e == E - 1 and t == T):
            sigma_e = s0 * (s1 / s0) ** (e / E)
            sigma_next = s0 * (s1 / s0) ** ((e + 1) / E)
            return _reference_staged(t - start, end - start, K, sigma_e, sigma_next)
    raise AssertionError("unreachable")


TOTALS = (1, 7, 58, 116, 1000)


@pytest.mark.parametrize("stages", range(2, 13))
def test_staged_decay_equals_formula_every_step(stages):
    for s0, s1 in ((1e-2, 1e-4), (5e-3, 5e-3), (1.0, 0.5)):
        schedule = StagedDecay(s0, s1, stages=stages)
        for T in TOTALS:
            for t in range(T + 5):  # past the end too
                assert schedule.sigma_at(t, T) == _reference_staged(t, T, stages, s0, s1), (s0, s1, T, t)
            assert schedule.table(T) == [(t, _reference_staged(t, T, stages, s0, s1)) for t in range(T)]


def test_staged_decay_shape():
    schedule = StagedDecay(1e-2, 1e-4, stages=10)
    values = [s for _, s in schedule.table(1000)]
    assert values[:100] == [0.0] * 100 and values[100] == 1e-2  # warm-up interval, then sigma_start
    assert schedule.sigma_at(1000, 1000) == schedule.sigma_at(5000, 1000) == pytest.approx(1e-4, rel=1e-12)
    noisy = values[100:]
    assert all(a >= b for a, b in zip(noisy, noisy[1:])) and len(set(noisy)) == 9  # K-1 stages
    assert StagedDecay(1e-2, 1e-4, stages=2).table(4) == [(0, 0.0), (1, 0.0), (2, 1e-2), (3, 1e-2)]
    assert StagedDecay(1e-2, 1e-4, stages=12).table(1) == [(0, 0.0)]  # T < K: the one step is warm-up
    assert StagedDecay(1e-2, 1e-4, stages=12).sigma_at(1, 1) == pytest.approx(1e-4, rel=1e-12)


@pytest.mark.parametrize("stages", range(2, 7))
@pytest.mark.parametrize(("total", "per_epoch"), [(1, 1), (7, 3), (58, 20), (116, 58), (1000, 100), (10, 40)])
def test_epoch_aware_equals_formula_and_restarts(stages, total, per_epoch):
    s0, s1 = 1e-2, 1e-4
    schedule = EpochAwareDecay(s0, s1, stages_per_epoch=stages)
    for t in range(total + 5):
        expected = _reference_epoch_aware(t, total, stages, s0, s1, per_epoch)
        assert schedule.sigma_at(t, total, per_epoch) == expected, t
    epochs = math.ceil(total / per_epoch)
    for e in range(epochs):
        start = e * per_epoch
        assert schedule.sigma_at(start, total, per_epoch) == 0.0  # every epoch opens with a warm-up
    # The run ends at sigma_end; with 2 stages the one noisy stage holds the epoch's start value.
    end = s1 if stages > 2 else schedule.epoch_sigma(epochs - 1, epochs)
    assert schedule.sigma_at(total, total, per_epoch) == pytest.approx(end, rel=1e-12)


def test_epoch_aware_decays_from_epoch_start_to_end():
    schedule = EpochAwareDecay(1e-2, 1e-4, stages_per_epoch=5)
    table = dict(schedule.table(300, steps_per_epoch=100))
    for e in range(3):
        epoch = [table[s] for s in range(100 * e, 100 * e + 100)]
        assert epoch[:20] == [0.0] * 20  # warm-up: the first of 5 stages
        assert epoch[20] == pytest.approx(1e-2 * 1e-2 ** (e / 3), rel=1e-12)  # sigma_e
        assert epoch[-1] == pytest.approx(1e-2 * 1e-2 ** ((e + 1) / 3), rel=1e-12)  # sigma_{e+1}
    assert Constant(3e-3).table(5) == [(s, 3e-3) for s in range(5)]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: StagedDecay(1e-2, 0.0), ["sigma_end", "> 0", "0.0"]),
        (lambda: StagedDecay(0.0, 0.0), ["sigma_start", "> 0"]),
        (lambda: StagedDecay(-1e-3, 1e-4), ["sigma_start", "-0.001"]),
        (lambda: StagedDecay(1e-2, -1e-4), ["sigma_end", "-0.0001"]),
        (lambda: StagedDecay(1e-4, 1e-2), ["below sigma_end", "swapped"]),
        (lambda: StagedDecay(1e-2, 1e-4, stages=1), ["stages", ">= 2", "1"]),
        (lambda: StagedDecay(1e-2, 1e-4, stages=0), ["stages", ">= 2"]),
        (lambda: StagedDecay(1e-2, 1e-4, stages=2.5), ["stages", "integer", "2.5"]),
        (lambda: StagedDecay(1e-2, 1e-4, stages=True), ["stages", "integer"]),
        (lambda: StagedDecay(float("nan"), 1e-4), ["sigma_start", "finite", "nan"]),
        (lambda: StagedDecay("0.01", 1e-4), ["sigma_start", "number", "'0.01'"]),
        (lambda: EpochAwareDecay(1e-2, 0), ["sigma_end", "> 0"]),
        (lambda: EpochAwareDecay(1e-2, 1e-4, stages_per_epoch=1), ["stages_per_epoch", ">= 2"]),
        (lambda: Constant(-1e-3), ["sigma", ">= 0", "-0.001"]),
        (lambda: Constant(float("inf")), ["sigma", "finite"]),
        (lambda: StagedDecay(1e-2, 1e-4).sigma_at(-1, 10), ["step", ">= 0", "-1"]),
        (lambda: StagedDecay(1e-2, 1e-4).sigma_at(1.5, 10), ["step", "integer", "1.5"]),
        (lambda: StagedDecay(1e-2, 1e-4).sigma_at(0, 0), ["total_steps", ">= 1", "0"]),
        (lambda: EpochAwareDecay(1e-2, 1e-4).sigma_at(0, 10), ["steps_per_epoch"]),
        (lambda: EpochAwareDecay(1e-2, 1e-4).sigma_at(0, 10, 0), ["steps_per_epoch", ">= 1"]),
    ],
)
def test_schedule_bad_input_is_a_clear_error(make, words):
    with pytest.raises(ValueError) as info:
        make()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# --- 2. noise lands in low precision (fast part: bf16 norms near 1) --------------------------


def test_bf16_norms_near_one_noise_lands_naive_add_does_not():
    """Norm weights in [1.1, 1.9] (bf16 spacing 2**-7): sigma 1e-3 is 1/8 of a unit in the last place."""
    sigma = 1e-3
    model = _tiny_llama(hidden=256, dtype=torch.bfloat16, norm_range=(1.1, 1.9))
    clean = {n: p.detach().clone() for n, p in _norm_weights(model).items()}
    aqn = AQN(Constant(sigma), seed=3)
    nearest = AQN(Constant(sigma), seed=3, rounding="nearest")
    changed = naive_changed = nearest_changed = total = 0
    moved, drawn_sq, cross = 0.0, 0.0, 0.0
    for step in range(5):
        with aqn.noisy(model, step, 5):
            for name, p in _norm_weights(model).items():
                noise = sigma * aqn.standard_noise(name, p.shape, step)
                naive = clean[name] + noise.to(torch.bfloat16)  # the pitfall: add in bf16
                diff = p.detach().float() - clean[name].float()
                changed += int((p != clean[name]).sum())
                naive_changed += int((naive != clean[name]).sum())
                total += p.numel()
                cross += float((diff * noise).sum())
                drawn_sq += float((noise * noise).sum())
        with nearest.noisy(model, step, 5):
            nearest_changed += sum(int((p != clean[n]).sum()) for n, p in _norm_weights(model).items())
    # Stochastic rounding changes about E|noise| / spacing = 0.8e-3 / 7.8e-3 of the weights...
    assert 0.06 < changed / total < 0.15, changed / total
    # ... while a plain bf16 add (or a round-to-nearest cast) loses nearly all of the noise.
    assert naive_changed / total < 0.01 and nearest_changed / total < 0.01
    # Unbiased: regressing what landed on what was drawn gives slope 1 (0 if the noise vanished).
    assert cross / drawn_sq == pytest.approx(1.0, abs=0.1)
    for s in aqn.stats().values():
        assert s.requested_sigma == sigma and s.master_noise_std == pytest.approx(sigma, rel=0.15)
        assert s.effective_std > sigma  # rounding to the bf16 grid adds variance; reported, not hidden


# --- 3. no drift, reproducible draws -------------------------------------------------------


def test_thousand_apply_restore_cycles_bit_identical():
    model = _tiny_llama(hidden=32, layers=2, dtype=torch.bfloat16, norm_range=(0.5, 1.5))
    start = _snapshot(model)
    aqn = AQN(StagedDecay(1e-2, 1e-3, stages=4), targets=("rmsnorm", "linear"), seed=11)
    noised = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the linear-sigma warning is tested elsewhere
        for cycle in range(1000):
            aqn.apply(model, cycle % 40, 40)  # includes warm-up steps (sigma 0)
            noised += bool(_changed(model, start))
            aqn.restore(model)
    assert noised == 750  # every step outside the warm-up (10 of each 40) changed weights
    assert _changed(model, start) == []


def test_same_seed_and_step_same_noise_in_any_order():
    base = _tiny_llama(dtype=torch.bfloat16, norm_range=(0.2, 1.5))
    clean = _snapshot(base)

    def noisy_state(aqn, step, warmup_steps=()):
        for other in warmup_steps:  # other draws before this one must not change it
            aqn.apply(base, other, 100)
        aqn.apply(base, step, 100)
        state = {k: v.clone() for k, v in base.state_dict().items() if "norm" in k}
        aqn.restore(base)
        return state

    first = noisy_state(AQN(Constant(1e-3), seed=5), 7)
    again = noisy_state(AQN(Constant(1e-3), seed=5), 7, warmup_steps=(3, 99, 7, 0))
    other_step = noisy_state(AQN(Constant(1e-3), seed=5), 8)
    other_seed = noisy_state(AQN(Constant(1e-3), seed=6), 7)
    assert all(_bit_equal(first[k], again[k]) for k in first)
    assert all(not _bit_equal(first[k], other_step[k]) for k in first)
    assert all(not _bit_equal(first[k], other_seed[k]) for k in first)
    assert _changed(base, clean) == []
    # Layers get different streams, not one stream shifted.
    aqn = AQN(Constant(1e-3))
    a = aqn.standard_noise("model.layers.0.input_layernorm.weight", (64,), 7)
    b = aqn.standard_noise("model.layers.1.input_layernorm.weight", (64,), 7)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.5


def test_noise_never_accumulates_and_master_follows_weight_updates():
    model = _tiny_llama(dtype=torch.bfloat16, norm_range=(0.2, 1.5))
    aqn = AQN(Constant(1e-2), seed=1)
    aqn.apply(model, 5, 10)
    once = _snapshot(model)
    aqn.apply(model, 3, 10)
    aqn.apply(model, 5, 10)  # redrawn from the clean copy, not on top of the noisy weights
    assert _changed(model, once) == []
    aqn.restore(model)
    # An optimizer step between rollouts: the next apply must start from the updated weights.
    norm = model.model.layers[0].input_layernorm.weight
    with torch.no_grad():
        norm.add_(0.5)
    updated = _snapshot(model)
    aqn.apply(model, 5, 10)
    aqn.restore(model)
    assert _changed(model, updated) == []


def test_weights_modified_while_noisy_warns_and_restores_clean():
    model = _tiny_llama()
    clean = _snapshot(model)
    aqn = AQN(Constant(1e-2))
    aqn.apply(model, 1, 10)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # e.g. an optimizer step taken on the noisy weights
    with pytest.warns(RuntimeWarning, match="model.norm.weight.*modified in place|modified in place.*model.norm.weight"):
        aqn.restore(model)
    assert _changed(model, clean) == []


def test_exception_inside_noisy_restores_weights():
    model = _tiny_llama(dtype=torch.bfloat16, norm_range=(0.2, 1.5))
    clean = _snapshot(model)
    aqn = AQN(Constant(1e-2), targets=("rmsnorm", "linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(KeyError, match="boom"):
            with aqn.noisy(model, 3, 10):
                assert _changed(model, clean)  # noise is on inside the block
                raise KeyError("boom")
    assert _changed(model, clean) == [] and not aqn.applied
    with pytest.raises(RuntimeError, match="nesting"):
        with aqn.noisy(model, 3, 10):
            with aqn.noisy(model, 4, 10):
                pass
    assert _changed(model, clean) == []


def test_warmup_sigma_zero_is_bit_identical_and_untouched():
    model = _tiny_llama(dtype=torch.bfloat16, norm_range=(0.2, 1.5))
    clean = _snapshot(model)
    versions = {n: p._version for n, p in model.named_parameters()}
    aqn = AQN(StagedDecay(1e-2, 1e-3, stages=10), targets=("rmsnorm", "linear"))
    with aqn.noisy(model, 9, 100) as active:  # step 9 of 100: first of 10 stages, the warm-up
        assert _changed(model, clean) == []
        assert all(s.requested_sigma == 0 and s.changed_fraction == 0 for s in active.stats().values())
    assert {n: p._version for n, p in model.named_parameters()} == versions  # never even written


# --- 4. multipliers and targeting ------------------------------------------------------------


def test_multiplier_scales_std_and_zero_leaves_layer_alone():
    model = _tiny_llama(hidden=256, layers=4)
    clean = _snapshot(model)
    aqn = AQN(Constant(1e-3), multipliers={"1": 1.5, 2: 0.0}, seed=2)
    sums = {}
    for step in range(40):
        with aqn.noisy(model, step, 40):
            for name, p in _norm_weights(model).items():
                diff = (p.detach() - clean[name]).double()
                layer = decoder_layer_index(name)
                total, count = sums.get(layer, (0.0, 0))
                sums[layer] = (total + float((diff**2).sum()), count + diff.numel())
            assert all(_bit_equal(p, clean[n]) for n, p in model.named_parameters() if ".layers.2." in n)
    std = {layer: math.sqrt(total / count) for layer, (total, count) in sums.items()}
    assert std[1] / std[0] == pytest.approx(1.5, rel=0.03)
    assert std[3] == pytest.approx(1e-3, rel=0.03) and std[None] == pytest.approx(1e-3, rel=0.05)
    assert std[2] == 0.0
    assert aqn.parameter_multipliers(model)["model.layers.1.post_attention_layernorm.weight"] == 1.5
    assert _changed(model, clean) == []


def test_targeted_json_touches_only_targeted_layers(tmp_path):
    path = tmp_path / "aqn.json"
    path.write_text(json.dumps({"layer_multipliers": {"1": 2.0}, "default_multiplier": 0.5, "targeted": [1, 2]}))
    model = _tiny_llama(layers=4)
    clean = _snapshot(model)
    aqn = AQN(Constant(1e-3), targets=("rmsnorm", "linear"), multipliers=path)
    with aqn.noisy(model, 0, 1):
        changed = set(_changed(model, clean))
        stats = aqn.stats()
    expected = {n for n, _ in model.named_parameters() if decoder_layer_index(n) in (1, 2)}
    assert changed == expected  # every weight of layers 1-2 (all are norm or linear weights) ...
    assert {s.layer for s in stats.values()} == {1, 2}  # ... and nothing else, final norm included
    assert {s.multiplier for s in stats.values() if s.layer == 1} == {2.0}
    assert {s.multiplier for s in stats.values() if s.layer == 2} == {0.5}
    assert _changed(model, clean) == []


def test_linear_noise_is_relative_and_warns_once():
    model = _tiny_llama(hidden=128)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :8] = 0.0
    clean = _snapshot(model)
    aqn = AQN(Constant(1e-2), targets="linear")
    with pytest.warns(UserWarning, match="linear"):
        aqn.apply(model, 0, 10)
    down = model.model.layers[0].mlp.down_proj.weight.detach()
    w0 = clean["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(down[:, :8], w0[:, :8])  # relative noise: zeros stay zero
    relative = (down[:, 8:] - w0[:, 8:]) / w0[:, 8:].abs()
    assert float(relative.std()) == pytest.approx(1e-2, rel=0.05)
    assert all(_bit_equal(p, clean[n]) for n, p in model.named_parameters() if "norm" in n or "embed" in n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per AQN: a second apply is silent
        aqn.apply(model, 1, 10)
        aqn.restore(model)
        quiet = AQN(Constant(4e-3), targets="linear")
        with quiet.noisy(model, 0, 10):
            pass
    assert _changed(model, clean) == []


# --- 5. bad input --------------------------------------------------------------------------


def test_multiplier_keys_outside_model_name_valid_range(tmp_path):
    model = _tiny_llama(layers=3)
    for multipliers in ({40: 1.5}, {"2": 1.0, "3": 1.0}):
        aqn = AQN(Constant(1e-3), multipliers=multipliers)
        with pytest.raises(ValueError, match=r"not decoder layer indices of this model; valid: 0-2"):
            aqn.apply(model, 0, 1)
        assert not aqn.applied
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"layer_multipliers": {}, "targeted": [7]}))
    with pytest.raises(ValueError, match=r"m\.json.*\[7\].*valid: 0-2"):
        AQN(Constant(1e-3), multipliers=path).apply(model, 0, 1)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"layer_multipliers": {"14": 1.5,}}', ["not valid JSON", "line 1"]),
        ("", ["not valid JSON"]),
        ("[1, 2]", ["must be a JSON object", "layer_multipliers"]),
        ('{"multipliers": {"14": 1.5}}', ["layer_multipliers"]),
        ('{"layer_multipliers": {"14": "big"}}', ["'big'", "finite number >= 0"]),
        ('{"layer_multipliers": {"14": -1}}', ["-1", ">= 0"]),
        ('{"layer_multipliers": {"fourteen": 1}}', ["'fourteen'", "decoder layer index"]),
        ('{"layer_multipliers": {}, "default_multiplier": null}', ["None", ">= 0"]),
        ('{"layer_multipliers": {}, "targeted": 14}', ["targeted", "list"]),
        ('{"layer_multipliers": {}, "targetted": [14]}', ["unknown key", "targetted", "targeted"]),
    ],
)
def test_malformed_multiplier_json_names_the_file(tmp_path, content, words):
    path = tmp_path / "layer_scan.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        AQN(Constant(1e-3), multipliers=path)
    assert "layer_scan.json" in str(info.value)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_aqn_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no-such.json"):
        AQN(Constant(1e-3), multipliers=tmp_path / "no-such.json")
    with pytest.raises(ValueError, match=r"unknown targets \['layernorm'\]; known: linear, rmsnorm"):
        AQN(Constant(1e-3), targets=("rmsnorm", "layernorm"))
    with pytest.raises(ValueError, match="rounding"):
        AQN(Constant(1e-3), rounding="up")
    with pytest.raises(ValueError, match="seed"):
        AQN(Constant(1e-3), seed=1.5)
    with pytest.raises(ValueError, match="Schedule"):
        AQN(1e-3)
    with pytest.raises(ValueError, match="multiplier inf"):
        AQN(Constant(1e-3), multipliers={3: float("inf")})
    with pytest.raises(ValueError, match="multipliers must be"):
        AQN(Constant(1e-3), multipliers=[1.5])
    with pytest.raises(ValueError, match="bad layer spec '14..17'"):
        AQN(Constant(1e-3), layers="14..17")
    with pytest.raises(ValueError, match=r"valid: 0-2"):
        AQN(Constant(1e-3), layers=[5]).apply(_tiny_llama(), 0, 1)
    with pytest.raises(ValueError, match="step"):
        AQN(Constant(1e-3)).apply(_tiny_llama(), -1, 10)
    model, other = _tiny_llama(), _tiny_llama()
    aqn = AQN(Constant(1e-3))
    aqn.apply(model, 0, 1)
    with pytest.raises(ValueError, match=r"no selected weight lies in the targeted layers \[2\]"):
        AQN(Constant(1e-3), layers="0-1", multipliers={"layer_multipliers": {}, "targeted": [2]}).apply(other, 0, 1)
    with pytest.raises(ValueError, match="another model"):
        aqn.apply(other, 0, 1)
    aqn.restore(model)
    assert LayerMultipliers.coerce({"3": 2}).multiplier(3) == 2.0


# --- the bundled model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    from hwnoise.models import load

    model, _ = load("default")
    return model


@pytest.fixture(scope="module")
def bundled_bf16(bundled):
    return copy.deepcopy(bundled).to(torch.bfloat16)


@pytest.mark.slow
def test_bundled_bf16_noise_lands(bundled, bundled_bf16, record_property):
    """It must show 2: the share of RMSNorm weights that change, and the master-noise std per layer.

    Pooled over 20 steps (about 700k draws) so that sampling error is far below the margins.
    """
    sigma, steps = 1e-3, 20
    aqn = AQN(Constant(sigma), seed=7)
    clean32 = {n: p.detach().clone() for n, p in _norm_weights(bundled).items()}
    clean16 = {n: p.detach().clone() for n, p in _norm_weights(bundled_bf16).items()}
    assert len(clean16) == 61
    sq = {}  # decoder layer -> (sum of squared master noise, count)
    counts = {"aqn": 0, "naive": 0, "total": 0, "aqn_ge1": 0, "naive_ge1": 0, "total_ge1": 0}
    cross = drawn_sq = 0.0
    for step in range(steps):
        # fp32 copy: the cast is the identity, so (w - clean) is exactly the noise in the fp32 master.
        with aqn.noisy(bundled, step, steps):
            master_noise = {n: p.detach() - clean32[n] for n, p in _norm_weights(bundled).items()}
        with aqn.noisy(bundled_bf16, step, steps):
            stats = aqn.stats()
            for name, p in _norm_weights(bundled_bf16).items():
                noise, clean, now = master_noise[name], clean16[name], p.detach()
                layer = decoder_layer_index(name)
                total, count = sq.get(layer, (0.0, 0))
                sq[layer] = (total + float((noise.double() ** 2).sum()), count + noise.numel())
                # The same draw reaches the bf16 model's master: its stats agree with the fp32 copy.
                assert stats[name].master_noise_std == pytest.approx(float(noise.double().std()), rel=1e-4)
                naive = clean + noise.to(torch.bfloat16)  # the pitfall: a plain add on bf16 weights
                big = clean.float().abs() >= 1.0
                counts["aqn"] += int((now != clean).sum())
                counts["naive"] += int((naive != clean).sum())
                counts["total"] += now.numel()
                counts["aqn_ge1"] += int((now != clean)[big].sum())
                counts["naive_ge1"] += int((naive != clean)[big].sum())
                counts["total_ge1"] += int(big.sum())
                cross += float(((now.double() - clean.double()) * noise.double()).sum())
                drawn_sq += float((noise.double() ** 2).sum())
    aqn_fraction = counts["aqn"] / counts["total"]
    naive_fraction = counts["naive"] / counts["total"]
    aqn_ge1 = counts["aqn_ge1"] / counts["total_ge1"]
    naive_ge1 = counts["naive_ge1"] / counts["total_ge1"]
    ratios = {layer: math.sqrt(total / count) / sigma for layer, (total, count) in sq.items()}
    report = (
        f"changed: AQN {aqn_fraction:.4f}, plain bf16 add {naive_fraction:.4f}; "
        f"weights |w|>=1 ({counts['total_ge1'] // steps} elements): AQN {aqn_ge1:.4f}, plain add {naive_ge1:.4f}; "
        f"slope {cross / drawn_sq:.4f}; master std / sigma per layer "
        f"{min(ratios.values()):.4f}..{max(ratios.values()):.4f}"
    )
    print(report)
    record_property("aqn_bf16", report)
    # Expected share for SmolLM2's norms (median |w| 0.26): 0.504 with stochastic rounding, 0.456 for
    # a plain add; one standard error of the pooled share is 0.0006.
    assert aqn_fraction > 0.5 and aqn_fraction > naive_fraction + 0.02, report
    assert naive_ge1 < 0.01 and aqn_ge1 > 0.05, report  # where the grid is coarse, the plain add loses it all
    assert cross / drawn_sq == pytest.approx(1.0, abs=0.05), report  # unbiased after the cast
    assert len(ratios) == 31 and all(abs(r - 1) < 0.05 for r in ratios.values()), ratios
    assert all(_bit_equal(p, clean16[n]) for n, p in _norm_weights(bundled_bf16).items())
    assert all(_bit_equal(p, clean32[n]) for n, p in _norm_weights(bundled).items())


@pytest.mark.slow
def test_bundled_multiplier_std_per_layer(bundled, record_property):
    """It must show 2 and 4: std of (noisy - clean) in the master within 5 % of sigma x multiplier."""
    sigma, steps = 1e-3, 10
    multipliers = {14: 1.5, 20: 0.5}
    aqn = AQN(Constant(sigma), multipliers=multipliers, seed=8)
    clean = {n: p.detach().clone() for n, p in _norm_weights(bundled).items()}
    sq = {}
    for step in range(steps):
        with aqn.noisy(bundled, step, steps):
            for name, p in _norm_weights(bundled).items():
                diff = (p.detach() - clean[name]).double()
                total, count = sq.get(decoder_layer_index(name), (0.0, 0))
                sq[decoder_layer_index(name)] = (total + float((diff**2).sum()), count + diff.numel())
    std = {layer: math.sqrt(total / count) for layer, (total, count) in sq.items()}
    ratios = {layer: s / (sigma * multipliers.get(layer, 1.0)) for layer, s in std.items()}
    report = f"master std / (sigma x multiplier) per layer {min(ratios.values()):.4f}..{max(ratios.values()):.4f}"
    print(report, f"layer 14 / 13: {std[14] / std[13]:.4f}, layer 20 / 19: {std[20] / std[19]:.4f}")
    record_property("aqn_multiplier_ratios", report)
    assert len(ratios) == 31 and all(abs(r - 1) < 0.05 for r in ratios.values()), ratios
    assert std[14] / std[13] == pytest.approx(1.5, rel=0.05) and std[20] / std[19] == pytest.approx(0.5, rel=0.05)
    assert all(_bit_equal(p, clean[n]) for n, p in _norm_weights(bundled).items())


@pytest.mark.slow
def test_bundled_cycles_bit_identical_and_targeting(bundled_bf16, tmp_path):
    start = _snapshot(bundled_bf16)
    aqn = AQN(StagedDecay(1e-2, 1e-3, stages=5), seed=4)
    for cycle in range(100):
        with aqn.noisy(bundled_bf16, cycle % 20, 20):
            pass
    assert _changed(bundled_bf16, start) == []

    path = tmp_path / "scan.json"
    path.write_text(json.dumps({"layer_multipliers": {"14": 1.5}, "default_multiplier": 1.0, "targeted": [14, 15]}))
    aqn = AQN(Constant(1e-3), targets=("rmsnorm", "linear"), multipliers=path)
    with aqn.noisy(bundled_bf16, 0, 1):
        changed = set(_changed(bundled_bf16, start))
        multipliers = {s.layer: s.multiplier for s in aqn.stats().values()}
    expected = {n for n, _ in bundled_bf16.named_parameters() if decoder_layer_index(n) in (14, 15)}
    assert len(expected) == 18 and changed == expected  # 2 norms + 7 linears per layer, nothing else
    assert multipliers == {14: 1.5, 15: 1.0}
    assert _changed(bundled_bf16, start) == []
    with pytest.raises(ValueError, match=r"\[30\].*valid: 0-29"):
        AQN(Constant(1e-3), multipliers={30: 1.5}).apply(bundled_bf16, 0, 1)
    assert hwnoise.AQN is AQN


def test_one_name_for_the_selection_and_the_rounding():
    import hwnoise.aqn

    with pytest.raises(TypeError, match="layer_types"):
        AQN(Constant(1e-3), layer_types=("rmsnorm", "linear"))
    assert not hasattr(AQN(Constant(1e-3)), "layer_types") and not hasattr(hwnoise.aqn, "ROUNDING_MODES")
    assert hwnoise.aqn.NOISE_ROUNDING == ("stochastic", "nearest")
    with pytest.raises(ValueError, match="unknown rounding 'rne'; known: stochastic, nearest"):
        AQN(Constant(1e-3), rounding="rne")
