"""`hwnoise train` checks its config once; the library leaves global settings alone; a run directory
saved with keys that no longer exist is refused, naming the key to use."""

from __future__ import annotations

import json
import pytest
import yaml
from torch import nn
from typer.testing import CliRunner

import hwnoise.cli.train  # noqa: F401  (registers the command)
import hwnoise.rl
import hwnoise.rl.run
from hwnoise.cli import app
from hwnoise.rl import ConfigError, TrainConfig
from hwnoise.rl.run import CONFIG_FILE

CONFIG = {"steps": 4, "finetune": "lora", "lora": {"targets": ["q_proj"]}, "logging": {"report_to": ["none"]},
          "emulation": {"rollout": "weights:mxfp4"}}


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(2, 2)


class _Meta(nn.Module):  # what _meta_model would build: module names only
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer()])


@pytest.fixture
def spies(monkeypatch):
    calls = {"validate": 0, "meta_model": 0, "progress": []}
    validate = TrainConfig.validate

    def counting_validate(self):
        calls["validate"] += 1
        return validate(self)

    def meta_model(spec):
        calls["meta_model"] += 1
        return _Meta()

    def stop(config):
        raise ConfigError("stopped before loading data")

    build = hwnoise.rl.run.build_trainer

    def recording_build(*args, **kwargs):
        calls["progress"].append(kwargs.get("progress"))
        return build(*args, **kwargs)

    monkeypatch.setattr(TrainConfig, "validate", counting_validate)
    monkeypatch.setattr(hwnoise.rl.run, "_meta_model", meta_model)
    monkeypatch.setattr(hwnoise.rl.run, "_problems", stop)  # the first step after every check
    monkeypatch.setattr(hwnoise.rl.run, "build_trainer", recording_build)
    return calls


def test_the_cli_validates_once_and_builds_the_meta_model_once(spies, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "stopped before loading data" in result.output, result.output
    assert spies["validate"] == 1
    assert spies["meta_model"] == 1
    assert spies["progress"] == [False]  # the CLI draws its own progress line


def test_a_config_changed_after_validation_is_validated_again(spies, tmp_path):
    config = TrainConfig.from_dict(dict(CONFIG, run_dir=str(tmp_path / "run"))).validate()
    assert config.is_validated
    config.set("steps", 5)
    assert not config.is_validated
    with pytest.raises(ConfigError, match="stopped before loading data"):
        hwnoise.rl.train(config)
    assert spies["validate"] == 2 and spies["meta_model"] == 1
    assert spies["progress"] == [True]  # library default: the Trainer's own bar, as TRL sets it


def test_library_calls_leave_the_progress_bar_setting_alone(spies, tmp_path):
    from transformers.utils import logging as hf_logging

    from hwnoise.rl.run import _grpo_config

    config = TrainConfig.from_dict(dict(CONFIG, run_dir=str(tmp_path / "run")))
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        with pytest.raises(ConfigError):
            hwnoise.rl.train(config)
        assert hf_logging.is_progress_bar_enabled() is enabled
    hf_logging.enable_progress_bar()
    assert _grpo_config(config, "cpu", progress=False).disable_tqdm is True
    from trl import GRPOConfig

    default = GRPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none").disable_tqdm
    assert _grpo_config(config, "cpu").disable_tqdm == default


def _finished_run(tmp_path, saved: dict):
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 4}))
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(saved))
    return run_dir


OLD = {"steps": 4, "logging": {"report_to": ["none"]}, "aqn": {"enabled": True, "layer_types": ["rmsnorm"]},
       "emulation": {"weight_format": "mxfp4", "weight_phase": "both", "noise": "relative", "noise_scale": 0.05,
                     "noise_phase": "rollout"}}
NEW = {"steps": 4, "logging": {"report_to": ["none"]}, "aqn": {"enabled": True, "targets": ["rmsnorm"]},
       "algorithm": {"gradient_checkpointing": False},
       "emulation": {"rollout": "weights:mxfp4+relative:0.05@ops", "training": "weights:mxfp4"}}


def test_a_run_saved_with_old_keys_is_refused_naming_the_new_ones(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("built a trainer")

    monkeypatch.setattr(hwnoise.rl.run, "build_trainer", refuse)
    run_dir = _finished_run(tmp_path, dict(OLD, algorithm={"gradient_checkpointing": False}))
    config = TrainConfig.from_dict(dict(NEW, run_dir=str(run_dir)))
    with pytest.raises(ConfigError) as err:
        hwnoise.rl.train(config, resume="latest")
    text = str(err.value)
    for old in ("emulation.weight_format", "emulation.noise_scale", "aqn.layer_types"):
        assert f"unknown key {old!r}" in text, text  # every old key named, not the first alone
    assert "'emulation.rollout' or 'emulation.training'" in text and "'aqn.targets'" in text


def test_the_saved_config_round_trips(tmp_path):
    config = TrainConfig.from_dict(NEW)
    path = tmp_path / CONFIG_FILE
    path.write_text(config.to_yaml())
    saved = yaml.safe_load(path.read_text())
    assert saved["emulation"] == NEW["emulation"] and saved["aqn"]["targets"] == ["rmsnorm"]
    assert TrainConfig.from_yaml(path) == config
