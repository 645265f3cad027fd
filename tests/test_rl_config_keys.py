"""TrainConfig keys that used to be ignored (LoRA keys under full fine-tuning) and the checkpoint
retention default (the 10-step example kept every 1.6 GB checkpoint)."""

from __future__ import annotations

import pytest

from hwnoise.rl import ConfigError, TrainConfig

BASE = {"steps": 6, "run_dir": "unused"}


def _refused(data, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data, overrides).validate()
    return str(info.value)


@pytest.mark.parametrize(("override", "shown"), [
    ("lora.rank=-1", "lora.rank=-1"),
    ("lora.targets=q_proj,v_proj", "lora.targets=('q_proj', 'v_proj')"),
    ("lora.alpha=8", "lora.alpha=8"),
])
def test_lora_keys_without_lora_are_refused(override, shown):
    text = _refused(BASE, override)
    assert shown in text and "finetune: full" in text and "finetune: lora" in text


def test_lora_keys_with_lora_and_defaults_under_full_are_accepted(tmp_path):
    TrainConfig.from_dict(BASE, ["finetune=lora", "lora.targets=q_proj,v_proj"]).validate()
    full = TrainConfig.from_dict(BASE).validate()  # its resolved YAML lists the lora defaults: still valid
    path = tmp_path / "resolved.yaml"
    path.write_text(full.to_yaml())
    TrainConfig.from_yaml(path).validate()
    assert "needs lora.rank >= 1" in _refused(BASE, "finetune=lora", "lora.rank=0")  # lora's own checks stay


def test_checkpoints_keep_the_last_only_by_default():
    from hwnoise.rl.run import _grpo_config

    config = TrainConfig.from_dict(BASE, ["logging.save_steps=5"]).validate()
    assert config.logging.save_total_limit == 1
    assert "null" in TrainConfig.fields_help()["logging.save_total_limit"]  # documented with --keys
    assert _grpo_config(config, "cpu").save_total_limit == 1  # what TRL's Trainer rotates by
    keep_all = TrainConfig.from_dict(BASE, ["logging.save_total_limit=null"]).validate()
    assert _grpo_config(keep_all, "cpu").save_total_limit is None
    assert "logging.save_total_limit must be >= 1" in _refused(BASE, "logging.save_total_limit=0")
