"""Issue 25: `hn.mismatch` on tiny models -- exact zero when both sides share numerics, the training
side scored by the training weights (not the rollout's), the statistics against independent
formulas, the per-module attribution's known answer, the plan search on the mismatch, and bad
input refused before the model loads."""

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, bit_identical, snapshot, tiny_llama, trained_tiny_llama  # noqa: E402

import hwnoise as hn  # noqa: E402
from hwnoise.emulation import Emulation  # noqa: E402
from hwnoise.mismatch import WeightsChanged, attribute, module_changes, search_mismatch_plan  # noqa: E402
from hwnoise.mismatch.stats import cluster_interval, position_buckets, setting_stats  # noqa: E402
from hwnoise.scan.texts import BUILTIN_TEXTS  # noqa: E402

PROMPTS = ["1+1?", "What is 2+3?", "Tom has 4 apples and eats 1.", "7 times 6?", "Half of 10?", "9-4?"]
FRAGILE = "model.layers.1.mlp.down_proj"
KW = dict(prompts=PROMPTS, n=6, max_new_tokens=10, batch_size=3)


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), ByteTokenizer()


@pytest.fixture(scope="module")
def report(tiny):
    model, tok = tiny
    return hn.mismatch(model, tok, ["clean", "weights:mxfp4", "weights:bf16", "relative:0.05@ops"],
                       keep_tokens=True, **KW)


# -- 3. exact zero when the numerics are shared; the training side is the training policy ---------------------


def test_clean_is_zero_to_the_last_bit(report):
    s = report.setting("clean")
    d = s["tokens_data"]
    assert s["tokens"] > 20
    assert np.array_equal(d["training_logp"], d["rollout_logp"])  # bit for bit
    for name, m in s["metrics"].items():
        want = 1.0 if name == "ratio_mean" else 0.0  # rho = 1 on every token
        assert m["mean"] == want and m["low"] == want and m["high"] == want, name
    assert report.setting("clean")["max_abs_logp_diff"] == 0.0


@pytest.mark.parametrize("spec", ["weights:mxfp4", "relative:0.05@ops"])
def test_same_emulation_on_both_sides_is_zero(tiny, spec):
    model, tok = tiny
    r = hn.mismatch(model, tok, [spec], training=spec, **KW)
    assert r.value(spec) == 0.0 and r.value(spec, "kl_exact") == 0.0


def _independent_logp(model, samples):
    """Log-probabilities of every row's completion tokens from one plain full forward (no hwnoise)."""
    batch = samples.batch()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.targets[..., None])[..., 0]
    return np.concatenate([lp[r][batch.valid[r]].double().numpy() for r in range(lp.shape[0])])


def test_the_training_side_uses_the_training_weights_and_the_rollout_side_its_own(tiny, report):
    """Fails if the scoring silently uses the rollout weights for both sides (or the clean ones for both)."""
    model, _ = tiny
    s = report.setting("weights:mxfp4")
    d, samples = s["tokens_data"], s["samples"]
    clean_copy = copy.deepcopy(model)
    np.testing.assert_allclose(d["training_logp"], _independent_logp(clean_copy, samples), atol=2e-5, rtol=0)
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in hn.select.select_modules(quantized, "linear").items():
            m.weight.copy_(hn.quantize(m.weight, "mxfp4"))
    np.testing.assert_allclose(d["rollout_logp"], _independent_logp(quantized, samples), atol=2e-5, rtol=0)
    assert s["metrics"]["abs_logp_diff"]["mean"] > 1e-3  # the two sides differ
    assert np.abs(d["training_logp"] - d["rollout_logp"]).max() > 1e-3


class _LeakyEmulation(Emulation):
    """An emulation that writes quantized weights in place and never puts them back."""

    def applied(self, model, seed=0, step=0, *, grad=False, substep=0):
        from contextlib import nullcontext

        if substep == 1:  # the scoring pass
            with torch.no_grad():
                for m in hn.select.select_modules(model, "linear").values():
                    m.weight.copy_(hn.quantize(m.weight, "mxfp4"))
        return nullcontext()


def test_a_rollout_emulation_that_leaks_into_the_training_side_is_an_error():
    model, tok = tiny_llama(), ByteTokenizer()
    with pytest.raises(WeightsChanged, match="training side would be scored with the rollout's weights"):
        hn.mismatch(model, tok, [_LeakyEmulation(weight_format="mxfp4")], **KW)


def test_the_model_is_bit_identical_afterwards(tiny):
    model, tok = tiny
    snap = snapshot(model)
    hn.mismatch(model, tok, ["weights:nvfp4", "aqn:0.01", "relative:0.05@output"], **KW)
    assert bit_identical(model, snap)


def test_sampler_logprobs_are_the_drawn_tokens_logprobs(tiny):
    """The sampler's own log-probabilities (KV cache, left padding) agree with the teacher-forced
    clean forward up to float rounding: they belong to the tokens they are stored with."""
    model, tok = tiny
    r = hn.mismatch(model, tok, ["clean"], rollout_logprobs="sampler", keep_tokens=True, **KW)
    d = r.setting("clean")["tokens_data"]
    np.testing.assert_allclose(d["rollout_logp"], d["training_logp"], atol=1e-4, rtol=0)
    assert r.value("clean") < 1e-4


def test_ranking_follows_the_format_width(report):
    order = [row["spec"] for row in report.ranking]
    assert order.index("weights:mxfp4") < order.index("weights:bf16") < order.index("clean")
    assert report.value("weights:mxfp4") > 10 * report.value("weights:bf16") > 0
    j = report.to_json()
    assert "tokens_data" not in j["settings"][0] and j["identity"]["settings"][0] in {s["spec"] for s in j["settings"]}


# -- the statistics against independent formulas ------------------------------------------------------------


def test_statistics_match_the_hosts_formulas():
    rng = np.random.default_rng(0)
    n_prompts, per = 12, 9
    lr = rng.normal(0, 0.3, n_prompts * per)
    kl = rng.uniform(0, 0.1, lr.size)
    prompt = np.repeat(np.arange(n_prompts), per)
    position = np.tile(np.arange(per), n_prompts)
    st = setting_stats(lr, kl, position, prompt, prompt.copy(), n_prompts, clip=2.0, max_new_tokens=per)
    m = st["metrics"]
    rho = np.exp(lr)
    # TRL: mean |old - sampling|; verl: masked_mean(rollout - old), masked_mean(exp(lr) - lr - 1), E[rho^2] - 1
    assert m["abs_logp_diff"]["mean"] == pytest.approx(np.abs(lr).mean())
    assert m["kl_k1"]["mean"] == pytest.approx((-lr).mean())
    assert m["kl_k3"]["mean"] == pytest.approx((rho - lr - 1).mean())
    assert m["chi2_token"]["mean"] == pytest.approx((rho ** 2).mean() - 1)
    assert m["ratio_above_clip"]["mean"] == pytest.approx((rho > 2).mean())
    seq = lr.reshape(n_prompts, per).sum(1)
    assert m["chi2_seq"]["mean"] == pytest.approx(np.exp(2 * seq).mean() - 1)
    assert m["seq_ratio_outside_clip"]["mean"] == pytest.approx((np.abs(seq) > math.log(2)).mean())
    for name, v in m.items():
        assert v["low"] <= v["mean"] <= v["high"], name
    assert m["abs_logp_diff"]["low"] < m["abs_logp_diff"]["high"]
    assert sum(b["tokens"] for b in st["by_position"]) == lr.size


def test_cluster_interval_resamples_prompts_not_tokens():
    # Two prompts with very different means and many tokens each: a token bootstrap would give a
    # narrow interval; resampling prompts spans (nearly) both prompt means.
    sums, counts = np.array([0.0, 100.0]), np.array([100.0, 100.0])
    low, high = cluster_interval(sums, counts)
    assert low <= 0.05 and high >= 0.95
    assert cluster_interval([2.0, 4.0], [1, 2]) == (2.0, 2.0)  # every prompt agrees: a point
    more = cluster_interval(np.tile([0.0, 100.0], 50), np.full(100, 100.0))
    assert more[1] - more[0] < high - low


def test_position_buckets_cover_the_completion():
    assert position_buckets(64) == [(0, 8), (8, 16), (16, 32), (32, 64)]
    assert position_buckets(50)[-1] == (32, 50)
    assert position_buckets(4) == [(0, 4)]


# -- 2. per-module attribution: a known answer by construction ------------------------------------------------


@pytest.fixture(scope="module")
def fragile():
    """As in test_scan_plan: the same function, but FRAGILE's 32-blocks hold values 2^8 apart, so
    MXFP4's shared scale flushes half of them to zero."""
    from hwnoise.scan.calibration import tokenize

    tok = ByteTokenizer()
    texts = list(BUILTIN_TEXTS[:8])
    model = trained_tiny_llama(tok, texts, steps=60)
    mlp = model.model.layers[1].mlp
    n = mlp.up_proj.weight.shape[0]
    d = torch.where(torch.arange(n) % 2 == 0, torch.tensor(1.0), torch.tensor(2.0 ** -8))
    batch = tokenize(tok, texts, 32)
    with torch.no_grad():
        before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mlp.up_proj.weight.mul_(d[:, None])
        mlp.down_proj.weight.div_(d[None, :])
        after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    return model, tok


def test_attribution_ranks_the_fragile_module_first(fragile):
    model, tok = fragile
    snap = snapshot(model)
    a = attribute(model, tok, "weights:mxfp4", **KW)
    assert a["modules"][0]["module"] == FRAGILE
    assert a["modules"][0]["kl"] > 3 * a["modules"][1]["kl"]
    assert bit_identical(model, snap)


def test_attribution_of_one_module_is_an_independent_measurement(fragile):
    """The attributed KL of FRAGILE equals KL(training || rollout) from two plain forwards with only
    FRAGILE's weight quantized (in place, on a copy)."""
    from hwnoise.mismatch import policy_samples

    model, tok = fragile
    samples = policy_samples(model, tok, prompts=PROMPTS, n=6, max_new_tokens=10, batch_size=3)
    a = attribute(model, tok, "weights:mxfp4", samples=samples)
    row = next(r for r in a["modules"] if r["module"] == FRAGILE)
    other = copy.deepcopy(model)
    with torch.no_grad():
        w = other.get_submodule(FRAGILE).weight
        w.copy_(hn.quantize(w, "mxfp4"))
        lp_t = torch.log_softmax(model(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits[:, :-1].double(), -1)
        lp_r = torch.log_softmax(other(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits[:, :-1].double(), -1)
    kl = (lp_t.exp() * (lp_t - lp_r)).sum(-1)[samples.valid].mean().item()
    assert row["kl"] == pytest.approx(kl, rel=1e-3)


def test_attribution_refuses_what_is_not_per_module(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="every GEMM call"):
        module_changes(model, "relative:0.05@ops")
    with pytest.raises(ValueError, match="every norm"):
        module_changes(model, "aqn:0.01")
    with pytest.raises(ValueError, match="clean setting"):
        module_changes(model, "clean")
    changes = module_changes(model, "relative:0.05@output+targets:*.down_proj")
    assert sorted(changes) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


def test_plan_search_on_the_mismatch_buys_back_the_fragile_module_first(fragile):
    model, tok = fragile
    plan = search_mismatch_plan(model, tok, "mxfp4", "bf16", held_out=False, **KW)
    assert plan.changes[0]["module"] == FRAGILE and plan.formats[FRAGILE] == "bf16"
    assert plan.points[1]["kl"] < 0.5 * plan.points[0]["kl"]


# -- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"clip": 1.0}, "clip must be a number > 1"),
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"rank_by": "nope"}, "unknown rank_by 'nope'"),
    ({"rollout_logprobs": "vllm"}, "unknown rollout_logprobs"),
    ({"engine": "vllm"}, "unknown engine 'vllm'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
])
def test_bad_options_are_refused_before_sampling(kwargs, match, monkeypatch):
    import hwnoise.mismatch.core as core

    monkeypatch.setattr(core, "sample", lambda *a, **k: pytest.fail("sampled before refusing bad input"))
    with pytest.raises(ValueError, match=match):
        hn.mismatch(torch.nn.Linear(2, 2), ByteTokenizer(), ["clean"], **kwargs)


@pytest.mark.parametrize("args, match", [
    (["--rollout", "weights:nope"], "nope"),
    (["--rollout", "clean", "--clip", "0.5"], "clip must be a number > 1"),
    (["--rollout", "clean", "--engine", "vllm"], "unknown engine"),
    (["--rollout", "clean", "--prompts", "nope.txt"], "nope.txt"),
    (["--rollout", "clean", "--attribute", "relative:0.05@ops"], "operator noise"),
    (["--rollout", "clean", "--plan", "int2"], "int2"),
    (["--rollout", "clean", "--target-kl", "0.1"], "plan target"),
    ([], "at least one --rollout"),
])
def test_cli_refuses_bad_input_before_the_model_loads(args, match, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import hwnoise.models
    from hwnoise.cli import app

    monkeypatch.setattr(hwnoise.models, "load", lambda *a, **k: pytest.fail("the model loaded before refusing"))
    result = CliRunner().invoke(app, ["mismatch", "default", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


# -- the short training loop (what the prediction is checked against) ---------------------------------------


class _DecodingByteTokenizer(ByteTokenizer):
    def decode(self, ids, skip_special_tokens=True):
        return bytes(max(0, min(255, i - 2)) for i in ids if i >= 2).decode("utf-8", "replace")


def test_training_loop_logs_the_sampler_difference_and_updates_a_copy(tiny):
    from hwnoise.mismatch.training import measure_in_training

    model, _ = tiny
    snap = snapshot(model)
    out = measure_in_training(model, _DecodingByteTokenizer(), ["clean", "weights:mxfp4"], steps=2, n=2, group=2,
                              max_new_tokens=6, lr=1e-3)
    clean, mx = out["settings"]
    assert [r["step"] for r in clean["steps"]] == [0, 1]
    # clean: the sampler (KV cache) and the training forward agree to float rounding; mxfp4: they do not
    assert clean["steps"][0]["abs_logp_diff"] < 1e-4
    assert mx["steps"][0]["abs_logp_diff"] > 10 * max(clean["steps"][0]["abs_logp_diff"], 1e-6)
    assert bit_identical(model, snap)  # the loop trains a copy
