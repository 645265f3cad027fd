"""The weight-stream fake quantization: what the rollout engine receives is W4A16 of the actor."""

import asyncio
from types import SimpleNamespace

import pytest
import torch
from _verl_models import tiny_llama

import hwnoise as hn
from hwnoise.integrations.verl.rollout import StreamStats, fake_quantize_stream, make_server_adapter


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "hif4"])
def test_linear_weights_quantized_others_passed(fmt):
    model = tiny_llama(torch.bfloat16, layers=1, hidden=64)
    stream = [(n, p.detach()) for n, p in model.named_parameters()]
    stream.append(("model.layers.0.self_attn.q_proj.lora_A.weight", torch.randn(4, 64, dtype=torch.bfloat16)))
    stats = StreamStats()
    out = dict(fake_quantize_stream(iter(stream), fmt, stats=stats))
    for name, tensor in stream:
        got = out[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        linear = tensor.dim() == 2 and not any(k in name for k in ("embed_tokens", "lm_head", "lora_"))
        if linear:
            assert torch.equal(got, hn.quantize(tensor, fmt)), name
            assert not torch.equal(got, tensor), name
        else:
            assert got is tensor, name
    assert stats.weights_quantized == 7 and 0 < stats.sqnr_db < 40


def test_mxfp4_values_on_the_fp4_grid():
    # an independent check: each 32-block of a quantized row is a power of two times an E2M1 value
    w = torch.randn(8, 64)
    (_, q), = fake_quantize_stream([("model.layers.0.mlp.up_proj.weight", w)], "mxfp4")
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    seen = []
    for block in q.reshape(-1, 32):
        source = w.reshape(-1, 32)[len(seen)]
        seen.append(block)
        scale = 2 ** (torch.floor(torch.log2(source.abs().max())) - 2)  # OCP floor: exp(amax) - emax(E2M1)
        vals = block.abs() / scale
        assert torch.all((vals[:, None] - grid[None]).abs().min(dim=1).values == 0)


def test_unknown_format_fails_before_the_first_tensor():
    def stream():
        raise AssertionError("the stream must not be read")
        yield

    with pytest.raises(ValueError, match="mxfp5"):
        next(fake_quantize_stream(stream(), "mxfp5"))


class FakeServerAdapter:
    """verl's ServerAdapter.update_weights: consumes the (name, tensor) stream."""

    def __init__(self, custom):
        self.config = SimpleNamespace(custom=custom)
        self.received = None

    async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
        self.received = dict(weights)


def test_server_adapter_quantizes_when_configured_and_passes_through_otherwise():
    w = torch.randn(16, 64)
    Adapter = make_server_adapter(FakeServerAdapter)
    quantizing = Adapter({"hwnoise": {"emulation": "weights:nvfp4"}})
    asyncio.run(quantizing.update_weights(iter([("model.layers.0.mlp.down_proj.weight", w)]), global_steps=1))
    assert torch.equal(quantizing.received["model.layers.0.mlp.down_proj.weight"], hn.quantize(w, "nvfp4"))
    assert quantizing.hwnoise_stream_stats.weights_quantized == 1
    plain = Adapter(None)
    asyncio.run(plain.update_weights(iter([("model.layers.0.mlp.down_proj.weight", w)]), global_steps=1))
    assert plain.received["model.layers.0.mlp.down_proj.weight"] is w
    with pytest.raises(ValueError, match="delta_flush"):
        asyncio.run(quantizing.update_weights(iter([]), global_steps=1, wire_format="delta_flush"))
