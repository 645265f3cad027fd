"""TrainConfig: YAML + key=value overrides, and every impossible configuration refused before a model loads."""

import json
from pathlib import Path

import pytest

from hwnoise.rl import ConfigError, TrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def valid(**sections):
    data = {"steps": 6, **sections}
    return TrainConfig.from_dict(data)


def refused(data, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data, overrides).validate()
    return str(info.value)


# -- loading and overrides ------------------------------------------------------------------------


def test_every_field_has_help_text():
    keys = TrainConfig.fields_help()
    assert len(keys) > 50
    assert all(text.strip() for text in keys.values()), [k for k, t in keys.items() if not t.strip()]


def test_yaml_nested_sections_and_dotted_keys_mean_the_same(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("steps: 6\naqn:\n  enabled: true\n  sigma_start: 0.02\nlora:\n  targets: [q_proj, v_proj]\n")
    dotted = tmp_path / "dotted.yaml"
    dotted.write_text("steps: 6\naqn.enabled: true\naqn.sigma_start: 0.02\nlora.targets: [q_proj, v_proj]\n")
    a, b = TrainConfig.from_yaml(nested), TrainConfig.from_yaml(dotted)
    assert a == b
    assert a.aqn.sigma_start == 0.02 and a.lora.targets == ("q_proj", "v_proj")


def test_overrides_take_their_types_from_the_dataclass():
    c = TrainConfig.from_dict({"steps": 3}, [
        "steps=6", "aqn.sigma_start=1e-2", "aqn.enabled=true", "finetune=lora", "lora.targets=q_proj, v_proj",
        "emulation.rollout=weights:mxfp4+relative:0.05@ops[linear]", "algorithm.epsilon_high=0.28", "eval.settings=[clean, rollout]",
        "data.eval=null", "run_dir=out/x=1",
    ])
    assert c.steps == 6 and isinstance(c.steps, int)
    assert c.aqn.sigma_start == 0.01 and isinstance(c.aqn.sigma_start, float)
    assert c.aqn.enabled is True
    assert c.lora.targets == ("q_proj", "v_proj")
    assert c.emulation.rollout == "weights:mxfp4+relative:0.05@ops[linear]"
    assert c.algorithm.epsilon_high == 0.28
    assert c.eval.settings == ("clean", "rollout")
    assert c.data.eval is None
    assert c.run_dir == "out/x=1"  # only the first '=' splits
    c.validate()


def test_override_wins_over_yaml_and_null_clears_an_optional(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 6\nemulation:\n  rollout: weights:nvfp4\n")
    c = TrainConfig.from_yaml(path, ["emulation.rollout=null", "steps=2"])
    assert c.emulation.rollout is None and c.steps == 2


@pytest.mark.parametrize("override, message", [
    ("steps=abc", "steps must be an integer"),
    ("aqn.enabled=maybe", "aqn.enabled must be true or false"),
    ("aqn.sigma_start=high", "aqn.sigma_start must be a number"),
    ("seed=null", "seed cannot be null"),
    ("novalue", "expected key=value"),
])
def test_bad_override_values_name_the_key_and_the_type(override, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({}, [override])


def test_unknown_key_lists_close_matches_and_the_known_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"steps": 6}, ["aqn.sigma_strat=0.1"])
    text = str(info.value)
    assert "'aqn.sigma_strat'" in text and "did you mean 'aqn.sigma_start'" in text
    assert "known keys:" in text and "lora.targets" in text and "emulation.rollout" in text
    path = tmp_path / "c.yaml"
    path.write_text("steps: 6\nlora:\n  rnk: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rnk'; did you mean 'lora.rank'"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match=r"did you mean 'aqn.sigma_end'"):  # a field without its section
        TrainConfig.from_dict({"sigma_end": 0.1})


def test_a_section_given_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="section 'aqn' must be a mapping"):
        TrainConfig.from_dict({"aqn": 0.01})


def test_resolved_config_round_trips_through_yaml(tmp_path):
    c = valid(aqn={"enabled": True, "schedule": "constant"}, lora={"targets": ["q_proj"]})
    path = tmp_path / "resolved.yaml"
    path.write_text(c.to_yaml())
    assert TrainConfig.from_yaml(path) == c


def test_unreadable_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [6\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(bad)


# -- validation -----------------------------------------------------------------------------------


def test_defaults_with_steps_are_valid():
    valid().validate()


@pytest.mark.parametrize("data, message", [
    ({"finetune": "lora", "lora": {"rank": 0}}, "finetune: lora needs lora.rank >= 1; got 0"),
    ({"steps": None, "epochs": None}, "exactly one of steps and epochs"),
    ({"epochs": 2}, "exactly one of steps and epochs"),
    ({"aqn": {"enabled": True, "schedule": "epoch_aware"}}, "epoch_aware restarts each epoch, so it needs `epochs`"),
    ({"aqn": {"enabled": True, "sigma_start": 0.001, "sigma_end": 0.01}},
     "aqn (staged schedule): sigma_start (0.001) is below sigma_end (0.01)"),
    ({"aqn": {"enabled": True, "sigma_end": 0.0}}, "aqn (staged schedule): sigma_end must be > 0 for a geometric decay"),
    ({"aqn": {"enabled": True, "stages": 1}}, "aqn (staged schedule): stages must be an integer >= 2"),
    ({"aqn": {"enabled": True, "targets": ["layernorm"]}}, "aqn.targets: unknown targets ['layernorm']"),
    ({"aqn": {"enabled": True, "schedule": "cosine"}}, "aqn.schedule: unknown value 'cosine'; known: staged, epoch_aware, constant"),
    ({"algorithm": {"num_generations": 3, "batch_size": 4}}, "= 4) must be divisible by algorithm.num_generations (3)"),
    ({"algorithm": {"num_generations": 1, "batch_size": 4}}, "algorithm.num_generations must be >= 2"),
    ({"algorithm": {"loss_type": "ppo"}}, "algorithm.loss_type: unknown value 'ppo'; known: grpo, dapo, dr_grpo, bnpo"),
    ({"data": {"train": "/nonexistent/gsm8k/train.jsonl"}}, "data file '/nonexistent/gsm8k/train.jsonl' does not exist"),
    ({"data": {"train": "mnist"}}, "unknown data 'mnist'"),
    ({"aqn": {"enabled": True, "multipliers": "/nonexistent/sigma_multipliers.json"}},
     "cannot read AQN multipliers file '/nonexistent/sigma_multipliers.json'"),
    ({"emulation": {"rollout": "weights:mxfp5"}}, "emulation.rollout: unknown format 'mxfp5'"),
    ({"emulation": {"training": "gaussian:0.05@ops"}}, "emulation.training: unknown part 'gaussian:0.05@ops'"),
    ({"emulation": {"rollout": "relative:0.05@ops[linear,conv]"}}, "emulation.rollout: "),
    ({"emulation": {"training": "relative:0.05@ops"}}, "needs algorithm.gradient_checkpointing: false"),
    ({"rollout": {"engine": "vllm"}, "emulation": {"rollout": "relative:0.05@ops"}},
     "cannot run inside vLLM: operator noise 'relative:0.05@ops'"),
    ({"rollout": {"engine": "vllm"}, "emulation": {"rollout": "inputs:mxfp4"}}, "the input format 'inputs:mxfp4'"),
    ({"rollout": {"engine": "vllm"}, "aqn": {"enabled": True, "targets": ["linear"]}},
     "inside vLLM AQN reaches the RMSNorm weights only"),
    ({"rollout": {"engine": "vllm", "vllm_mode": "server"}, "aqn": {"enabled": True}}, "rollout.vllm_mode: server"),
    ({"rollout": {"engine": "sglang"}}, "rollout.engine: unknown value 'sglang'; known: hf, vllm"),
    ({"eval": {"settings": ["clean", "rollout"]}}, "no emulation applies in the rollout phase"),
    ({"model": "./no/such/model.gguf"}, "no such model file or directory"),
    ({"reward": {"bonus_only_if_correct": True}}, "reward.format_bonus is 0: it would do nothing"),
    ({"reward": {"mode": "strict", "format_bonus": 0.5, "bonus_only_if_correct": True}}, "only rescales the reward"),
])
def test_impossible_configurations_are_refused_by_name(data, message):
    assert message in refused({"steps": 6, **data})


def test_all_problems_are_reported_at_once():
    text = refused({"steps": 6, "finetune": "lora", "lora": {"rank": 0}, "aqn": {"enabled": True, "sigma_end": 1.0}})
    assert "lora.rank" in text and "sigma_end" in text


def test_training_phase_emulation_without_checkpointing_is_valid():
    valid(emulation={"rollout": "relative:0.05@ops", "training": "relative:0.05@ops"},
          algorithm={"gradient_checkpointing": False}).validate()
    valid(emulation={"rollout": "clean", "training": "clean"}, eval={"settings": ["clean"]}).validate()


def test_vllm_allows_weight_side_emulation_and_aqn():
    # Weight formats/plans and AQN run inside vLLM (hwnoise.engines.vllm_emulation); where vLLM is not
    # installed the only complaint left must be about that, never about the emulation.
    import importlib.util

    c = valid(rollout={"engine": "vllm"}, emulation={"rollout": "weights:mxfp4+aqn:0.01"}, aqn={"enabled": True})
    assert c.use_vllm
    if importlib.util.find_spec("vllm") is not None:
        c.validate()
        return
    with pytest.raises(ConfigError) as info:
        c.validate()
    lines = str(info.value).splitlines()[1:]
    assert lines and all("vllm is not installed" in line for line in lines), lines


def test_emulation_for_gives_each_phase_its_emulation():
    from hwnoise.emulation import Emulation

    c = valid(emulation={"rollout": "weights:mxfp4+inputs:nvfp4", "training": "weights:mxfp4+relative:0.05@ops"},
              algorithm={"gradient_checkpointing": False})
    assert c.emulation_for("rollout") == Emulation(weight_format="mxfp4", input_format="nvfp4")
    assert c.emulation_for("training") == Emulation(weight_format="mxfp4", error="relative:0.05")
    assert valid().emulation_for("rollout").is_clean
    with pytest.raises(ValueError, match="unknown phase 'both'; known: rollout, training"):
        c.emulation_for("both")


@pytest.mark.parametrize("key, value, new", [
    ("emulation.weight_format", "mxfp4", "emulation.rollout"),
    ("emulation.noise_scale", 0.05, "emulation.rollout"),
    ("emulation.noise", "relative", "emulation.training"),
    ("emulation.input_phase", "both", "emulation.rollout"),
    ("aqn.layer_types", ["rmsnorm"], "aqn.targets"),
])
def test_old_keys_are_refused_naming_the_new_key(key, value, new):
    """Issue 20 item 8: no old key is read or silently ignored; the error names the key to use."""
    section, _, name = key.partition(".")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"steps": 6, section: {name: value}})
    text = str(err.value)
    assert f"unknown key {key!r}" in text.splitlines()[0] and repr(new) in text.splitlines()[0], text
    with pytest.raises(ConfigError, match=rf"command line: unknown key {key!r}"):
        TrainConfig.from_dict({"steps": 6}, [f"{key}={value if not isinstance(value, list) else value[0]}"])


def test_every_unknown_key_is_named_at_once():
    """Issue 20 item 14: two (or more) unknown keys, in the file and on the command line, all named."""
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"steps": 6, "aqn": {"sigma_strat": 0.1}, "lora": {"rnk": 4}, "nonsense": 1},
                              ["algorithm.lr=1e-5"])
    text = str(err.value)
    assert text.startswith("4 unknown keys:"), text
    for key in ("aqn.sigma_strat", "lora.rnk", "nonsense", "algorithm.lr"):
        assert f"unknown key {key!r}" in text, (key, text)
    assert "did you mean 'aqn.sigma_start'" in text and "did you mean 'lora.rank'" in text
    assert "command line: unknown key 'algorithm.lr'" in text


def test_no_old_module_names():
    import hwnoise.rl.config as config_module
    import hwnoise.rl.run as run_module

    assert not hasattr(config_module, "PHASES") and not hasattr(run_module, "RUN_FILE")
    assert run_module.TRAIN_RUN_FILE == "run.json"


# -- refused before any model loads ---------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    import hwnoise.models

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(hwnoise.models, "load", forbidden)


def test_train_refuses_a_bad_config_before_loading_the_model(no_model_loads, tmp_path):
    from hwnoise.rl import train

    c = valid(run_dir=str(tmp_path / "run"), data={"train": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match="does not exist"):
        train(c)
    assert not (tmp_path / "run").exists()


def test_lora_targets_that_match_nothing_list_the_module_names(no_model_loads, tmp_path):
    from hwnoise.rl import train

    c = valid(run_dir=str(tmp_path / "run"), finetune="lora", lora={"targets": ["q_proj", "qkv_proj"]})
    with pytest.raises(ConfigError) as info:
        train(c)
    text = str(info.value)
    assert "'qkv_proj' matches no module" in text and "'q_proj'" not in text.split("matches")[0].replace("qkv", "")
    assert "down_proj" in text and "input_layernorm" in text  # the names that do exist


def test_multipliers_for_layers_the_model_lacks_are_refused(no_model_loads, tmp_path):
    from hwnoise.rl import train

    path = tmp_path / "sigma_multipliers.json"
    path.write_text(json.dumps({"layer_multipliers": {"14": 1.5, "40": 2.0}, "default_multiplier": 1.0}))
    c = valid(run_dir=str(tmp_path / "run"), aqn={"enabled": True, "multipliers": str(path)})
    with pytest.raises(ConfigError, match=r"\[40\] are not decoder layer indices"):
        train(c)


def test_cli_reports_a_bad_config_as_a_clear_error(no_model_loads, tmp_path):
    from typer.testing import CliRunner

    import hwnoise.cli.train  # noqa: F401  (registers the command until cli/__init__ imports it)
    from hwnoise.cli import app

    path = tmp_path / "c.yaml"
    path.write_text("steps: 6\naqn:\n  enabled: true\n  sigma_start: 0.001\n  sigma_end: 0.01\n")
    result = CliRunner().invoke(app, ["train", str(path), "finetune=lora", "lora.rank=0"])
    assert result.exit_code == 2, result.output
    assert "sigma_end" in result.output and "lora.rank" in result.output
    result = CliRunner().invoke(app, ["train", str(path), "aqn.sigma_strat=1"])
    assert result.exit_code == 2 and "did you mean" in result.output


def test_cli_resume_latest_without_checkpoints_is_refused(no_model_loads, tmp_path):
    from typer.testing import CliRunner

    import hwnoise.cli.train  # noqa: F401  (registers the command until cli/__init__ imports it)
    from hwnoise.cli import app

    path = tmp_path / "c.yaml"
    path.write_text(f"steps: 6\nrun_dir: {tmp_path / 'run'}\n")
    result = CliRunner().invoke(app, ["train", str(path), "--resume", "latest"])
    assert result.exit_code == 2 and "no checkpoint-N directory" in result.output


# -- the examples ---------------------------------------------------------------------------------


def test_every_example_config_is_valid_and_listed_in_the_readme(monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the examples' relative paths are from the repository root
    paths = sorted(EXAMPLES.glob("*.yaml"))
    assert len(paths) >= 10
    readme = (EXAMPLES / "README.md").read_text()
    from hwnoise.rl.run import check_model_structure

    for path in paths:
        c = TrainConfig.from_yaml(path)  # an old key would be an unknown key here
        c.validate()
        check_model_structure(c)
        assert path.name in readme, f"{path.name} is not in examples/README.md"


def test_resume_refuses_a_config_that_would_change_the_schedule_or_data(no_model_loads, tmp_path):
    from hwnoise.rl import train

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-3").mkdir(parents=True)
    (run_dir / "hwnoise_config.yaml").write_text(valid(run_dir=str(run_dir), aqn={"enabled": True}).to_yaml())
    changed = valid(run_dir=str(run_dir), aqn={"enabled": True}, steps=8)
    with pytest.raises(ConfigError, match=r"steps: 6 -> 8"):
        train(changed, resume="latest")
    # Reporting settings may change on resume; the check then passes and only the model is missing.
    same = valid(run_dir=str(run_dir), aqn={"enabled": True}, eval={"every": 2}, logging={"save_steps": 3})
    with pytest.raises(AssertionError, match="a model was loaded"):
        train(same, resume="latest")
