"""Issue 20, bad input round two: items 1, 2, 4, 5, 9, 10 and 11, each a test named after it, and
every command refusing every bad setting before a model loads where it can, always before it
generates or trains. Tiny models saved to a directory (no bundled model) and spies on the model
loader, generation and the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_eval import char_tokenizer, tiny_model
from typer.testing import CliRunner

import hwnoise.eval.core
import hwnoise.models
import hwnoise.rl.run
from hwnoise.cli import app
from hwnoise.data import load_problems
from hwnoise.eval import evaluate
from hwnoise.rl import ConfigError, TrainConfig
from hwnoise.rl.run import CONFIG_FILE, TRAIN_RUN_FILE

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [*map(str, args)])
    return result, " ".join(result.output.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def no_load(monkeypatch):
    """The weight loader (every command loads through hwnoise.models.load): a call fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"loaded a model for bad input: {args}")

    monkeypatch.setattr(hwnoise.models, "load", refuse)


def _no_generate(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("generated before refusing a bad setting")

    import importlib

    hf = importlib.import_module("hwnoise.engines.hf")
    monkeypatch.setattr(hf, "generate_greedy", refuse)  # what the "hf" engine generates with
    monkeypatch.setattr(hwnoise.eval.core, "generate_greedy", refuse, raising=False)  # before engines


@pytest.fixture
def no_generate(monkeypatch):
    _no_generate(monkeypatch)


@pytest.fixture
def no_trainer(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("built a trainer for bad input")

    monkeypatch.setattr(hwnoise.rl.run, "build_trainer", refuse)


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def plan_file(path: Path, mapping: dict) -> Path:
    path.write_text(json.dumps(mapping))
    return path


def train_config(model_dir, **overrides) -> dict:
    data = {"model": str(model_dir), "steps": 2, "seed": 0, "device": "cpu",
            "data": {"train": "arith:level=1", "n_train": 8, "n_eval": 2},
            "algorithm": {"num_generations": 2, "batch_size": 2, "max_completion_length": 4},
            "eval": {"max_new_tokens": 2, "batch_size": 2}, "logging": {"report_to": ["none"], "save_steps": 1}}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[key] = value
    return data


def config_file(tmp_path, model_dir, name="cfg.yaml", **overrides) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(train_config(model_dir, **overrides)))
    return path


def finished_run(tmp_path, model_dir, name="run", step=2, max_steps=2, **overrides) -> Path:
    """A run directory as `hwnoise train` leaves it (config, run.json, evaluations, a checkpoint),
    made without training: the tests that use it must refuse before any training."""
    run_dir = tmp_path / name
    config = TrainConfig.from_dict(dict(train_config(model_dir, **overrides), run_dir=str(run_dir)))
    checkpoint = run_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    (run_dir / CONFIG_FILE).write_text(config.to_yaml())
    (run_dir / TRAIN_RUN_FILE).write_text(json.dumps({"config": config.to_dict(), "status": "finished",
                                                      "steps": step, "max_steps": max_steps,
                                                      "log_history": [{"loss": 0.5, "step": 1}]}))
    (run_dir / "evals.jsonl").write_text(json.dumps({"step": step, "report": {"settings": []}}) + "\n")
    return run_dir


# -- item 1: --resume DIR that is not a checkpoint ----------------------------------------------


def test_item1_resume_of_a_directory_that_is_not_a_checkpoint_is_refused_before_the_model_loads(
        tmp_path, model_dir, no_load, no_trainer):
    run_dir = finished_run(tmp_path, model_dir)
    before = files_of(run_dir)
    not_a_checkpoint = tmp_path / "somewhere"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("mine")
    cfg = config_file(tmp_path, model_dir)
    result, text = run("train", cfg, "--out", run_dir, "--resume", not_a_checkpoint)
    assert result.exit_code == 2, result.output
    assert "is not a checkpoint" in text and "trainer_state.json" in text and str(not_a_checkpoint) in text
    assert files_of(run_dir) == before  # the finished run's run.json, log, evaluations and config as they were
    # the run directory itself: refused too, naming its newest checkpoint
    result, text = run("train", cfg, "--out", run_dir, "--resume", run_dir)
    assert result.exit_code == 2 and "checkpoint-2" in text
    assert files_of(run_dir) == before


# -- item 2: train --out replaces nothing of the user's; the closing line names what was written ----


def test_item2_train_keeps_a_users_readme_and_lists_only_what_it_wrote(tmp_path, model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes about this folder\n")
    (out / "data.csv").write_text("a,b\n1,2\n")
    cfg = config_file(tmp_path, model_dir)
    result, text = run("train", cfg, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "README.md").read_text() == "my notes about this folder\n"  # TRL's model card not written
    assert (out / "data.csv").read_text() == "a,b\n1,2\n"
    wrote = text.split("wrote", 1)[1]
    assert "run.json" in wrote and "hwnoise_config.yaml" in wrote and "checkpoint-2/" in wrote
    assert "tensorboard" not in wrote and not (out / "tensorboard").exists()  # report_to: none
    assert "README.md" not in wrote and "data.csv" not in wrote


def test_item2_train_refuses_a_run_json_it_did_not_write(tmp_path, model_dir, no_load, no_trainer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"my": "bookkeeping"}))
    result, text = run("train", config_file(tmp_path, model_dir), "--out", out)
    assert result.exit_code == 2, result.output
    assert "'run.json'" in text and "would be replaced" in text
    assert json.loads((out / "run.json").read_text()) == {"my": "bookkeeping"}


# -- item 4: one run identity: plan content, dtype ------------------------------------------------


def _problems():
    return load_problems("arith", n=2, seed=0)


def test_item4_eval_refuses_records_of_an_edited_plan(tmp_path, monkeypatch):
    model, tok = tiny_model(), char_tokenizer()
    plan = plan_file(tmp_path / "plan.json", {"model.layers.0.mlp.down_proj": "mxfp4"})
    out = tmp_path / "out"
    evaluate(model, tok, _problems(), [f"weights:{plan}"], batch_size=2, max_new_tokens=2, out=out)
    assert json.loads((out / "run.json").read_text())["plans"][str(plan)]
    records = (out / "records.jsonl").read_bytes()
    plan_file(plan, {"model.layers.0.mlp.down_proj": "mxfp8_e4m3"})  # same path, another plan
    _no_generate(monkeypatch)
    with pytest.raises(ValueError, match=r"plan .*plan\.json.*edited"):
        evaluate(model, tok, _problems(), [f"weights:{plan}"], batch_size=2, max_new_tokens=2, out=out)
    assert (out / "records.jsonl").read_bytes() == records


def test_item4_eval_refuses_fp32_records_for_an_fp16_rerun(tmp_path, no_generate):
    model, tok = tiny_model(), char_tokenizer()
    out = tmp_path / "out"
    out.mkdir()
    # an fp32 run's header, as evaluate writes it (generation is spied out: this test only refuses)
    header = hwnoise.eval.core._header("tiny", hwnoise.eval.core.parse_settings(["clean"]), 0, 2, 2,
                                       hwnoise.eval.core.check_problems(_problems()), dtype="fp32", device="cpu")
    (out / "run.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match=r"dtype: 'fp32' there, 'fp16' now"):
        evaluate(model, tok, _problems(), ["clean"], batch_size=2, max_new_tokens=2, out=out, dtype="fp16",
                 model_name="tiny")


def test_item4_train_resume_refuses_an_edited_plan(tmp_path, model_dir):
    plan = plan_file(tmp_path / "plan.json", {"model.layers.0.mlp.down_proj": "mxfp4"})
    run_dir = tmp_path / "run"
    cfg = config_file(tmp_path, model_dir, emulation__rollout=f"weights:{plan}")
    result, _ = run("train", cfg, "--out", run_dir)
    assert result.exit_code == 0, result.output
    identity = json.loads((run_dir / "identity.json").read_text())
    assert identity["plans"][str(plan)] and identity["dtype"] == "fp32" and identity["device"] == "cpu"
    before = files_of(run_dir)
    plan_file(plan, {"model.layers.0.mlp.down_proj": "mxfp8_e4m3"})
    result, text = run("train", cfg, "--out", run_dir, "--resume", "latest")
    assert result.exit_code == 2, result.output
    assert "plan.json" in text and "edited" in text
    assert files_of(run_dir) == before


# -- item 5: resume checks the checkpoint's run; a fresh run into a finished one -----------------


def test_item5_resume_of_another_runs_checkpoint_checks_that_runs_config(tmp_path, model_dir, no_load, no_trainer):
    other = finished_run(tmp_path, model_dir, name="other", step=1, max_steps=2)
    cfg = config_file(tmp_path, model_dir, seed=1)  # not the seed the checkpoint's run used
    result, text = run("train", cfg, "--out", tmp_path / "new", "--resume", other / "checkpoint-1")
    assert result.exit_code == 2, result.output
    assert "seed: 0 -> 1" in text and str(other) in text
    assert not (tmp_path / "new").exists()


def test_item5_a_fresh_run_into_a_finished_run_is_refused(tmp_path, model_dir, no_load, no_trainer):
    run_dir = finished_run(tmp_path, model_dir)
    before = files_of(run_dir)
    result, text = run("train", config_file(tmp_path, model_dir), "--out", run_dir)
    assert result.exit_code == 2, result.output
    assert "already holds a finished run" in text and "--resume latest" in text and "another --out" in text
    assert files_of(run_dir) == before


# -- item 9: --device-map auto without a GPU --------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note is for machines without CUDA")
def test_item9_device_map_auto_on_a_cpu_machine_says_so(tmp_path, model_dir):
    result, text = run("eval", model_dir, "--data", "arith", "--n", 2, "--noise", "0", "--max-new-tokens", 2,
                       "--batch-size", 2, "--device-map", "auto", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "--device-map auto" in text and "no CUDA device" in text and "on the CPU" in text


# -- item 10: every setting resolved against the model before the clean setting is generated ------


def _other_model_plan(tmp_path):
    return plan_file(tmp_path / "other.json", {"model.decoder.layers.0.fc1": "mxfp4"})


def _decoder_layer_plan(tmp_path):
    return plan_file(tmp_path / "layer.json", {"model.layers.0": "mxfp4", "model.layers.1.mlp.down_proj": "mxfp4"})


BAD_SETTINGS = [  # (setting, what the message names), for the tiny model (decoder layers 0-1)
    ("weights:mxfp4+targets:layers.5-2", "2"),
    ("weights:mxfp4+targets:layers.99", "99"),
    ("weights:mxfp4+targets:layers.-1", "layers.-1"),
    ("weights:mxfp4+exclude:*", "matched no module"),
    ("inputs:mxfp4+targets:*.nosuch_proj", "nosuch_proj"),
    ("absolute:0.01@output+targets:layers.99", "99"),
    (_other_model_plan, "model.decoder.layers.0.fc1"),
    (_decoder_layer_plan, "model.layers.0"),
]


def _setting(setting, tmp_path) -> str:
    return setting if isinstance(setting, str) else f"weights:{setting(tmp_path)}"


@pytest.mark.parametrize("setting,named", BAD_SETTINGS, ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_item10_evaluate_refuses_a_setting_that_does_not_fit_before_generating(tmp_path, setting, named, no_generate):
    spec = _setting(setting, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        evaluate(tiny_model(), char_tokenizer(), _problems(), ["relative:0.05@ops", spec], batch_size=2,
                 max_new_tokens=2, out=out)
    assert named in str(err.value) and "setting" in str(err.value)
    assert not out.exists()  # nothing written either: the fixed rerun starts clean


@pytest.mark.parametrize("setting,named", BAD_SETTINGS, ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_item10_eval_cli_refuses_a_setting_that_does_not_fit_before_loading(tmp_path, model_dir, setting, named,
                                                                            no_load):
    spec = _setting(setting, tmp_path)
    result, text = run("eval", model_dir, "--n", 2, "--setting", spec, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert named in text and "setting" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting,named", [BAD_SETTINGS[1], BAD_SETTINGS[6], BAD_SETTINGS[7]],
                         ids=["layers.99", "other-model-plan", "decoder-layer-plan"])
def test_item10_train_refuses_an_emulation_that_does_not_fit_before_training(tmp_path, model_dir, setting, named,
                                                                             no_load, no_trainer):
    spec = _setting(setting, tmp_path)
    config = TrainConfig.from_dict(dict(train_config(model_dir, emulation__rollout=spec), run_dir=str(tmp_path / "r")))
    with pytest.raises(ConfigError, match="emulation.rollout") as err:
        hwnoise.rl.run.preflight(config)
    assert named in str(err.value)
    result, text = run("train", config_file(tmp_path, model_dir, emulation__rollout=spec), "--out", tmp_path / "r")
    assert result.exit_code == 2 and named in text, result.output
    assert not (tmp_path / "r").exists()


# -- item 11: brackets survive in CLI errors -----------------------------------------------------------


def test_item11_cli_errors_quote_brackets_back_whole(tmp_path, no_load):
    result, text = run("eval", tmp_path / "no-model", "--setting", "relative:0.05@output[linear]",
                       "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "@output[linear]" in text and "output[linear]" in text
    result, text = run("eval", tmp_path / "no-model", "--setting", "relative:0.05@ops[nosuch]",
                       "--out", tmp_path / "out")
    assert result.exit_code == 2 and "nosuch" in text and "''" not in text


# -- "It must show" 2: every command refuses bad settings before a model loads -----------------


@pytest.mark.parametrize("args,named", [
    (("formats", "MODEL", "--formats", "mxfp5"), "mxfp5"),
    (("formats", "MODEL", "--formats", ","), "names no format"),
    (("formats", "MODEL", "--device", "tpu"), "tpu"),
    (("eval", "MODEL", "--setting", "weights:mxfp5"), "mxfp5"),
    (("eval", "MODEL", "--noise", "nan"), "nan"),
    (("eval", "MODEL", "--device-map", "balanced"), "balanced"),
    (("eval", "MODEL", "--setting", "weights:mxfp4+targets:layers.99"), "99"),
    (("scan", "MODEL", "--format", "mxfp5"), "mxfp5"),
    (("scan", "MODEL", "--dtype", "fp8"), "fp8"),
    (("scan", "MODEL", "--setting", "weights:mxfp4+targets:layers.99"), "99"),
    (("scan", "MODEL", "--setting", "weights:mxfp4+exclude:*"), "matched no module"),
    (("scan", "MODEL", "--plan", "bf16", "--target-kl", "-1"), "-1"),
    (("scan", "MODEL", "--plan", "bf16", "--budget-bits", "inf"), "inf"),
])
def test_every_command_refuses_bad_settings_before_loading(tmp_path, model_dir, args, named, no_load):
    args = [model_dir if a == "MODEL" else a for a in args]
    result, text = run(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert named in text
    assert not (tmp_path / "out").exists()


def test_train_and_report_refuse_bad_settings_before_work(tmp_path, model_dir, no_load, no_trainer):
    for overrides, named in (({"emulation__rollout": "weights:mxfp5"}, "mxfp5"),
                             ({"emulation__rollout": "weights:mxfp4+targets:layers.99"}, "99"),
                             ({"steps": 0}, "steps")):
        result, text = run("train", config_file(tmp_path, model_dir, **overrides), "--out", tmp_path / "r")
        assert result.exit_code == 2 and named in text, result.output
    assert not (tmp_path / "r").exists()
    run_dir = finished_run(tmp_path, model_dir)
    result, text = run("report", run_dir, "--metric", "exact", "--out", tmp_path / "rep")
    assert result.exit_code == 2 and "exact" in text, result.output
    result, text = run("report", tmp_path / "nowhere", "--out", tmp_path / "rep")
    assert result.exit_code == 2 and "nowhere" in text, result.output
    assert not (tmp_path / "rep").exists()
