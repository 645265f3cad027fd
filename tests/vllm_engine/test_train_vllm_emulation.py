"""The rollout emulation inside a real vLLM engine (CPU build), on the bundled model.

One in-process engine for the module (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate mode
runs it). Every weight read back from vLLM is read through vLLM itself (``vllm_weight``: the fused
parameter, or on the CPU backend the layer's own GEMM applied to the identity), and compared with
an independent reference: ``hwnoise.quantize`` of the HF tensor that was synced.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from hwnoise.aqn import AQN, Constant  # noqa: E402
from hwnoise.engines.vllm_emulation import VLLMEmulation, check_vllm_emulation, vllm_weight  # noqa: E402
from hwnoise.formats import quantize  # noqa: E402

pytestmark = pytest.mark.slow

# A sample of the weights: one of each fused part and of the plain linears, in two layers.
SAMPLE = [f"model.layers.{i}.{part}.weight" for i in (0, 17) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU backend would reserve most of RAM
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process, as in TRL's colocate mode
    from vllm import LLM

    from hwnoise.models import load, resolve

    path = resolve("default")
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=1024, seed=0, gpu_memory_utilization=0.15)
    hf, _ = load("default", device="cpu")
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    yield llm, model, hf
    del llm


def _shapes(hf):
    return {n: tuple(p.shape) for n, p in hf.named_parameters()}


def _perturbed(hf, scale):
    """Training-like new weights: every parameter moved a little (a sync must carry them)."""
    gen = torch.Generator().manual_seed(int(scale * 1e6))
    return {n: p.detach() + scale * torch.randn(p.shape, generator=gen) * p.detach().abs().mean()
            for n, p in hf.named_parameters()}


def _check_quantized(model, weights, shapes, fmt="mxfp4"):
    """Raise AssertionError unless vLLM holds quantize(w) bit for bit for every sampled weight."""
    for name in SAMPLE:
        got = vllm_weight(model, name, shapes)
        want = quantize(weights[name], fmt)
        assert torch.equal(got, want), f"{name}: vLLM's weight is not quantize(synced weight, {fmt!r})"


def test_readout_is_exact_on_clean_weights(engine):
    llm, model, hf = engine
    shapes = _shapes(hf)
    clean = VLLMEmulation("clean")
    clean.reload(model, hf.named_parameters(), llm.llm_engine.model_config)
    for name in SAMPLE:
        assert torch.equal(vllm_weight(model, name, shapes), hf.get_parameter(name).detach()), name


def test_weights_quantized_after_each_sync_and_noop_fails(engine):
    llm, model, hf = engine
    shapes, config = _shapes(hf), llm.llm_engine.model_config
    emu = VLLMEmulation("weights:mxfp4", reference=hf)
    assert "lm_head.weight" not in emu.formats and "model.embed_tokens.weight" not in emu.formats
    for sync in (1, 2):
        weights = _perturbed(hf, 0.01 * sync)
        emu.reload(model, weights.items(), config)
        stats = emu.take_stats()
        assert stats["weights_quantized"] == 30 * 7  # every decoder linear, nothing else
        _check_quantized(model, weights, shapes)
        assert not torch.equal(vllm_weight(model, SAMPLE[0], shapes), weights[SAMPLE[0]])
    # The no-op variant (a sync that does not re-quantize) must fail the same check.
    weights = _perturbed(hf, 0.03)
    with emu.suspended():
        emu.reload(model, weights.items(), config)
    with pytest.raises(AssertionError, match="is not quantize"):
        _check_quantized(model, weights, shapes)
    VLLMEmulation("clean").reload(model, hf.named_parameters(), config)


def test_attached_load_weights_quantizes(engine):
    llm, model, hf = engine
    shapes, config = _shapes(hf), llm.llm_engine.model_config
    emu = VLLMEmulation("weights:nvfp4+targets:*.down_proj", reference=hf)
    emu.attach(model)
    try:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        weights = _perturbed(hf, 0.02)
        initialize_layerwise_reload(model)
        model.load_weights(weights.items())  # what a caller of the plain API (TRL, verl) does
        finalize_layerwise_reload(model, config)
        name = "model.layers.3.mlp.down_proj.weight"
        assert torch.equal(vllm_weight(model, name, shapes), quantize(weights[name], "nvfp4"))
        other = "model.layers.3.mlp.up_proj.weight"  # not targeted: as synced
        assert torch.equal(vllm_weight(model, other, shapes), weights[other])
    finally:
        emu.detach(model)
    assert "load_weights" not in model.__dict__
    VLLMEmulation("clean").reload(model, hf.named_parameters(), config)


def _norms(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layernorm" in n or n == "model.norm.weight"}


def test_aqn_fresh_keyed_restored_never_accumulating(engine):
    llm, model, hf = engine
    clean = _norms(model)
    sigma = 0.01
    aqn = AQN(Constant(sigma), seed=7)
    emu = VLLMEmulation("clean", aqn=aqn)
    draws = {}
    for step in (0, 1, 0):
        with emu.noisy(model, step=step, total_steps=4):
            assert emu.noise_applied
            now = _norms(model)
            diffs = torch.cat([(now[n] - clean[n]).flatten() for n in clean])
            assert abs(float(diffs.std()) - sigma) < 0.1 * sigma, f"step {step}: std {float(diffs.std())}"
            # The draw is AQN's own keyed draw on the HF name: the reference is the standard noise.
            name = "model.layers.5.input_layernorm.weight"
            want = clean[name] + sigma * aqn.standard_noise(name, clean[name].shape, step)
            assert torch.equal(now[name], want)
            draws.setdefault(step, []).append(now[name])
        after = _norms(model)
        assert all(torch.equal(after[n], clean[n]) for n in clean), "AQN noise left on vLLM's norms"
        assert not emu.noise_applied
    assert torch.equal(draws[0][0], draws[0][1])  # keyed by step: replayed, not accumulated
    assert not torch.equal(draws[0][0], draws[1][0])


def test_aqn_noise_never_reaches_generation_after_the_block(engine):
    llm, model, hf = engine
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0)
    prompt = ["Question: 12 + 7 = ?\nAnswer:"]
    before = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    emu = VLLMEmulation("aqn:0.5", seed=1)  # destructive on purpose: it must show while applied
    with emu.noisy(model, step=0):
        noisy = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    llm.reset_prefix_cache()
    after = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert list(noisy) != list(before)
    assert list(after) == list(before)


@pytest.mark.parametrize("spec, words", [("relative:0.05@ops", "operator noise"),
                                          ("inputs:mxfp4", "input format"),
                                          ("absolute:1e-3@output", "module-level error")])
def test_refused_by_name(spec, words):
    with pytest.raises(ValueError, match=words):
        check_vllm_emulation(spec)
