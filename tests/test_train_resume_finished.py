"""`--resume latest` on a run that already reached its last step: say so, train nothing, exit 0
(the Trainer used to run an 11th step of 10)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

import hwnoise.rl
import hwnoise.rl.run
from hwnoise.cli import app
from hwnoise.rl import TrainConfig
from hwnoise.rl.run import CONFIG_FILE, TRAIN_RUN_FILE

CONFIG = {
    "steps": 4, "seed": 0, "data": {"train": "arith:level=1", "n_train": 16, "n_eval": 2},
    "algorithm": {"num_generations": 2, "batch_size": 2, "max_completion_length": 8},
    "eval": {"max_new_tokens": 4, "batch_size": 2}, "logging": {"report_to": ["none"], "save_steps": 2},
}


def _run_dir(tmp_path, global_step, max_steps=4):
    """A run directory as `hwnoise train` leaves it: its config, run.json and a checkpoint."""
    run_dir = tmp_path / "run"
    config = TrainConfig.from_dict(dict(CONFIG, run_dir=str(run_dir)))
    checkpoint = run_dir / f"checkpoint-{global_step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": global_step, "max_steps": max_steps}))
    (run_dir / CONFIG_FILE).write_text(config.to_yaml())
    (run_dir / TRAIN_RUN_FILE).write_text(json.dumps({"status": "finished", "steps": global_step}))
    return config, run_dir


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("built a trainer for a finished run")

    monkeypatch.setattr(hwnoise.rl.run, "build_trainer", refuse)


def test_resume_latest_on_a_finished_run_trains_nothing(tmp_path, no_training):
    config, run_dir = _run_dir(tmp_path, 4)
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert hwnoise.rl.train(config, resume="latest") == run_dir
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files  # nothing rewritten


def test_cli_resume_latest_on_a_finished_run_says_so_and_exits_0(tmp_path, no_training, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained a finished run")

    monkeypatch.setattr(hwnoise.rl, "train", refuse)
    _, run_dir = _run_dir(tmp_path, 4)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    result = CliRunner().invoke(app, ["train", str(config_file), "--out", str(run_dir), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "already finished" in result.output and "step 4 of 4" in result.output


def test_finished_at_reads_the_checkpoint_state(tmp_path):
    from hwnoise.rl.run import finished_at

    _, run_dir = _run_dir(tmp_path, 2)
    assert finished_at(run_dir / "checkpoint-2") is None  # step 2 of 4: training continues
    (run_dir / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 4}))
    assert finished_at(run_dir / "checkpoint-2") == (4, 4)
    assert finished_at(None) is None
    assert finished_at(tmp_path / "nowhere") is None  # unreadable: the Trainer reports it


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_resume_latest_after_the_last_step_with_a_real_trainer(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_rl_trainer import tiny_config, tiny_model

    import hwnoise.models

    _, tokenizer = hwnoise.models.load("default")
    config = tiny_config(tmp_path, steps=2, logging__save_steps=2, eval__at_start=False)
    run_dir = hwnoise.rl.train(config, model=tiny_model(tokenizer), tokenizer=tokenizer)
    assert json.loads((run_dir / TRAIN_RUN_FILE).read_text())["steps"] == 2
    again = hwnoise.rl.train(config, model=tiny_model(tokenizer), tokenizer=tokenizer, resume="latest")
    assert json.loads((again / TRAIN_RUN_FILE).read_text())["steps"] == 2  # not a third step
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
