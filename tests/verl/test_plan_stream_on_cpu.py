"""Issue 21: a verl rollout with ``emulation=weights:plan.json`` quantizes each streamed weight in
its planned format (through the Emulation, resolved once), or is refused at ``validate()``."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch

import hwnoise as hn
from hwnoise.integrations.verl.config import ConfigError, validate
from hwnoise.integrations.verl.rollout import StreamStats, fake_quantize_stream, make_server_adapter

R = "+actor_rollout_ref.rollout.custom.hwnoise"
BASE = ["actor_rollout_ref.rollout.enforce_eager=True", "actor_rollout_ref.rollout.name=vllm"]


def verl_config(overrides):
    """verl's own ppo_trainer config (its packaged YAML), composed by Hydra with ``overrides``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def with_override(override):
    return BASE + [override]

PLAN = {"model.layers.0.mlp.down_proj": "mxfp8_e4m3", "model.layers.0.self_attn.q_proj": "mxfp4",
        "model.layers.1.mlp.up_proj": "nvfp4"}


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN))
    return path


def _stream():
    g = torch.Generator().manual_seed(0)
    names = list(PLAN) + ["model.layers.1.mlp.down_proj", "lm_head"]
    return [(f"{n}.weight", torch.randn(16, 64, generator=g)) for n in names] + \
        [("model.layers.0.input_layernorm.weight", torch.randn(64, generator=g))]


def test_plan_in_the_stream_quantizes_each_module_in_its_planned_format(plan_file):
    stream = _stream()
    stats = StreamStats()
    out = dict(fake_quantize_stream(iter(stream), str(plan_file), stats=stats))
    clean = dict(stream)
    for module, fmt in PLAN.items():  # the reference: hwnoise.quantize in that module's format
        assert torch.equal(out[f"{module}.weight"], hn.quantize(clean[f"{module}.weight"], fmt)), module
        assert not torch.equal(out[f"{module}.weight"], clean[f"{module}.weight"])
    # Not in the plan: passed as they are (the same tensor objects), not quantized in some default format.
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert out[name] is clean[name], name
    assert stats.weights_quantized == 3 and stats.weights_passed == 3
    # Different formats really differ: mxfp8 keeps more than mxfp4 would have.
    w = clean["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(out["model.layers.0.mlp.down_proj.weight"], hn.quantize(w, "mxfp4"))


def test_plan_in_the_server_adapter_stream(plan_file):
    class FakeServerAdapter:
        def __init__(self, custom):
            self.config = SimpleNamespace(custom=custom)
            self.received = None

        async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
            self.received = dict(weights)

    stream = _stream()
    adapter = make_server_adapter(FakeServerAdapter)({"hwnoise": {"emulation": f"weights:{plan_file}"}})
    for step in (1, 2):  # the plan is read once, reused at the next sync
        asyncio.run(adapter.update_weights(iter(stream), global_steps=step))
        q = adapter.received["model.layers.1.mlp.up_proj.weight"]
        assert torch.equal(q, hn.quantize(dict(stream)["model.layers.1.mlp.up_proj.weight"], "nvfp4"))
        assert adapter.hwnoise_stream_stats.weights_quantized == 3


def test_plan_naming_modules_the_stream_lacks_is_an_error(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"model.layers.99.mlp.down_proj": "mxfp8_e4m3"}))
    with pytest.raises(ValueError, match="layers.99"):
        dict(fake_quantize_stream(iter(_stream()), str(path)))


def test_verl_validate_accepts_a_plan_and_refuses_a_bad_one_up_front(plan_file, tmp_path):
    s = validate(verl_config(with_override(f"{R}.emulation='weights:{plan_file}'")))
    assert s.weight_format == str(plan_file)
    with pytest.raises(ConfigError, match="not found"):
        validate(verl_config(with_override(f"{R}.emulation='weights:{tmp_path / 'missing.json'}'")))
    with pytest.raises(ConfigError, match="names its own modules"):
        validate(verl_config(with_override(f"{R}.emulation='weights:{plan_file}+targets:*.down_proj'")))
