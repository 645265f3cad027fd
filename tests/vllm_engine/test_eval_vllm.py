"""The vLLM evaluation engine (``VLLMEngine``, spawned engine process + hwnoise's worker extension)
on the bundled model: weights under a format after each load, AQN around batches, agreement with
the HF engine, resume. Weights are read back through vLLM itself (``vllm_weight``: on the CPU
backend the layer's own packed GEMM applied to the identity) and compared with an independent
reference computed in this process: ``hwnoise.quantize`` of the tensors that were loaded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hwnoise.emulation import Emulation
from hwnoise.engines.vllm_emulation import hf_weights
from hwnoise.engines.vllm_worker import perturbed_weights
from hwnoise.formats import quantize

pytestmark = pytest.mark.slow

SAMPLE = [f"model.layers.{i}.{part}.weight" for i in (0, 29) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _synced(engine, seed):
    """The tensors a load with perturb_seed=seed sends (computed here, independently of the engine)."""
    wanted = set(SAMPLE)
    return {n: t for n, t in perturbed_weights(hf_weights(engine.model_dir), seed, 0.05) if n in wanted}


def _mismatches(engine, expected: dict) -> list[str]:
    held = engine.read_weights(expected)
    return [n for n, w in expected.items() if not torch.equal(held[n], w)]


def test_mxfp4_weights_bit_equal_after_each_sync_and_a_broken_sync_fails(eval_engine):
    for sync in (1, 2):  # two syncs of different (training-like) weights
        stats = eval_engine.load("weights:mxfp4", perturb_seed=sync, perturb_scale=0.05)
        synced = _synced(eval_engine, sync)
        assert stats["weights_quantized"] >= 7 * 30, stats
        expected = {n: quantize(w, "mxfp4") for n, w in synced.items()}
        assert _mismatches(eval_engine, expected) == []
        # the quantization changed the weights (the check can tell quantized from clean)
        assert all(not torch.equal(expected[n], synced[n]) for n in SAMPLE)
    # the broken variant: a sync without re-quantization must fail the same check
    eval_engine.load("weights:mxfp4", perturb_seed=3, perturb_scale=0.05, quantize=False)
    expected = {n: quantize(w, "mxfp4") for n, w in _synced(eval_engine, 3).items()}
    assert sorted(_mismatches(eval_engine, expected)) == sorted(SAMPLE)
    # back to the clean checkpoint: the engine holds it bit for bit
    eval_engine.load("clean")
    clean = {n: t for n, t in hf_weights(eval_engine.model_dir) if n in set(SAMPLE)}
    assert _mismatches(eval_engine, clean) == []


def test_aqn_fresh_noise_of_the_scheduled_std_around_each_batch_clean_between(eval_engine):
    sigma = 0.02
    setting = Emulation.parse(f"aqn:{sigma}")
    eval_engine.load("clean")
    clean = eval_engine.norms()
    assert len(clean) == 61  # 2 per layer x 30, and the final norm
    draws = []
    for sync, step in ((1, 0), (2, 1)):
        eval_engine.load("clean", perturb_seed=sync, perturb_scale=0.0)  # a sync (same weights)
        with eval_engine.applied(setting, seed=0, step=step):
            noisy = eval_engine.norms()
            delta = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
            assert abs(float(delta.std()) / sigma - 1) < 0.10, float(delta.std())
            assert abs(eval_engine.noise_stats["effective_std_mean"] / sigma - 1) < 0.10
            draws.append(delta)
        after = eval_engine.norms()  # evaluation between blocks: clean, bit for bit
        assert all(torch.equal(after[n], clean[n]) for n in clean)
    assert not torch.equal(draws[0], draws[1])  # fresh noise per step, drawn from the clean copies


def test_refused_before_start_by_name():
    from hwnoise.engines.vllm import VLLMEngine

    engine = VLLMEngine("default")
    for spec, word in (("relative:0.05@ops", "operator noise"), ("inputs:mxfp4", "input format")):
        with pytest.raises(ValueError, match=word):
            engine.check([Emulation.parse(spec)])
    assert engine.llm is None  # nothing started


def test_eval_agrees_with_hf_and_resumes(eval_engine, tmp_path):
    import hwnoise
    from hwnoise.data import load_problems
    from hwnoise.eval.core import RECORDS_FILE, read_records
    from hwnoise.models import load

    problems = load_problems("arith", n=8, seed=0)
    kw = dict(batch_size=4, max_new_tokens=48, seed=0)
    hf_model, tok = load("default", device="cpu")
    hf = hwnoise.evaluate(hf_model, tok, problems, ["clean"], out=tmp_path / "hf", **kw)
    vl = hwnoise.evaluate(eval_engine, None, problems, ["clean", "weights:mxfp4"], out=tmp_path / "vllm",
                          engine="vllm", **kw)
    run = json.loads((tmp_path / "vllm" / "run.json").read_text())
    assert run["engine"] == "vllm" and run["dtype"] == "fp32"
    hf_rec = read_records(tmp_path / "hf" / RECORDS_FILE)
    vl_rec = read_records(tmp_path / "vllm" / RECORDS_FILE)
    same = sum(hf_rec[("clean", p.id)]["completion"] == vl_rec[("clean", p.id)]["completion"] for p in problems)
    assert same >= 7, same
    mx = [vl_rec[("weights:mxfp4", p.id)]["completion"] for p in problems]
    assert mx != [vl_rec[("clean", p.id)]["completion"] for p in problems]  # the format reached generation
    # resume: a run cut after its first batch (records of the rest gone, last line half written)
    lines = (tmp_path / "vllm" / RECORDS_FILE).read_text().splitlines(keepends=True)
    (tmp_path / "vllm" / RECORDS_FILE).write_text("".join(lines[:4]) + lines[4][:10])
    again = hwnoise.evaluate(eval_engine, None, problems, ["clean", "weights:mxfp4"], out=tmp_path / "vllm",
                             engine="vllm", **kw)
    assert again.to_json()["settings"] == vl.to_json()["settings"]
    assert not math.isnan(again.settings[0].accuracy("strict") if hasattr(again.settings[0], "accuracy") else 0.0)
    # another engine's records are not mixed in
    with pytest.raises(ValueError, match="engine"):
        hwnoise.evaluate(hf_model, tok, problems, ["clean"], out=tmp_path / "vllm", **kw)
