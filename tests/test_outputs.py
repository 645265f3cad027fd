"""Issue 20, "It must show" 3: no command deletes a file it does not write in that run, or
overwrites a file that is not one of its own named outputs. A folder is filled with user files,
the earlier outputs of every command and a finished training run; then every command runs there
(tiny model, tiny budgets) and after each the folder is compared with its state before."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

import pytest
import yaml
from test_eval import char_tokenizer, tiny_model
from typer.testing import CliRunner

from hwnoise.cli import app
from hwnoise.scan.report import ScanReport

runner = CliRunner()

# Each command's named outputs (top-level names in --out; a directory covers what is inside it).
NAMED = {
    "formats": {"formats.json"},
    "scan": set(ScanReport.OUTPUT_FILES),
    "eval": {"eval.json", "eval.png", "records.jsonl", "run.json"},
    "train": {"run.json", "hwnoise_config.yaml", "identity.json", "evals.jsonl", "evals", "tensorboard", "checkpoint-*"},
    "report": {"runs.json", "runs.md"},
}
USER_FILES = {
    "README.md": "my notes about these results\n",
    "notes.txt": "keep me\n",
    "data.csv": "a,b\n1,2\n",
    "figures/my_plot.png": "not really a png\n",
    "my_plan.json": json.dumps({"model.layers.0.mlp.down_proj": "mxfp8_e4m3"}),
}


def test_the_named_outputs_are_the_commands_own():
    from hwnoise.eval.core import EVAL_OUTPUTS
    from hwnoise.rl.run import train_outputs

    assert NAMED["eval"] == set(EVAL_OUTPUTS)
    assert NAMED["train"] == set(train_outputs()) | {"checkpoint-*"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def named(command: str, path: str) -> bool:
    top = path.split("/", 1)[0]
    return any(fnmatch.fnmatchcase(top, pattern) for pattern in NAMED[command])


def run_in(folder: Path, command: str, *args, expect=(0,)) -> str:
    """Run ``hwnoise COMMAND ARGS --out folder`` and check the folder against its state before."""
    before = state(folder)
    argv = [command, *map(str, args)]
    if command != "train":
        argv += ["--out", str(folder)]
    result = runner.invoke(app, argv)
    text = " ".join(result.output.split())
    assert result.exit_code in expect, f"{argv}: {result.output}"
    after = state(folder)
    deleted = [p for p in before if p not in after and not named(command, p)]
    changed = [p for p in before if p in after and after[p] != before[p] and not named(command, p)]
    created = [p for p in after if p not in before and not named(command, p)]
    assert not deleted, f"{command} deleted files it does not write: {deleted}"
    assert not changed, f"{command} overwrote files that are not its outputs: {changed}"
    assert not created, f"{command} wrote files it does not name as outputs: {created}"
    if result.exit_code != 0:
        assert after == before, f"{command} refused, yet changed the folder"
    for name, text_ in USER_FILES.items():
        assert (folder / name).read_text() == text_
    return text


def fill(folder: Path) -> None:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def train_config(tmp_path, model_dir, folder) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(model_dir), "steps": 2, "seed": 0, "device": "cpu", "run_dir": str(folder),
        "data": {"train": "arith:level=1", "n_train": 8, "n_eval": 2},
        "algorithm": {"num_generations": 2, "batch_size": 2, "max_completion_length": 4},
        "eval": {"max_new_tokens": 2, "batch_size": 2}, "logging": {"report_to": ["none"], "save_steps": 1}}))
    return path


def scan_args(model_dir, *extra):
    return (model_dir, "--samples", 2, "--max-length", 8, *extra)


def eval_args(model_dir, *extra):
    return (model_dir, "--n", 2, "--noise", "0,0.1", "--max-new-tokens", 2, "--batch-size", 2, *extra)


def test_every_command_in_a_folder_holding_a_finished_run_and_user_files(tmp_path, model_dir):
    folder = tmp_path / "results"
    folder.mkdir()
    fill(folder)
    cfg = train_config(tmp_path, model_dir, folder)
    run_in(folder, "train", cfg)  # a finished run beside the user's files
    assert json.loads((folder / "run.json").read_text())["status"] == "finished"
    run_in(folder, "formats", model_dir, "--formats", "mxfp4")
    run_in(folder, "scan", *scan_args(model_dir, "--plan", "bf16"))  # an earlier scan's plan.json
    plan = (folder / "plan.json").read_bytes()
    run_in(folder, "scan", *scan_args(model_dir, "--no-end-to-end"))  # a scan without --plan
    assert (folder / "plan.json").read_bytes() == plan  # what eval settings and train configs point at
    text = run_in(folder, "eval", *eval_args(model_dir), expect=(2,))  # its run.json is the training run's
    assert "'run.json'" in text
    run_in(folder, "report", folder)
    text = run_in(folder, "train", cfg, expect=(2,))  # a fresh run would replace the finished one
    assert "already holds a finished run" in text
    text = run_in(folder, "train", cfg, "--resume", "latest")
    assert "already finished" in text
    run_in(folder, "formats", model_dir, "--formats", "nvfp4")  # again: replaces its own formats.json only


def test_every_command_in_a_folder_holding_an_evaluation_and_user_files(tmp_path, model_dir):
    folder = tmp_path / "results"
    folder.mkdir()
    fill(folder)
    run_in(folder, "eval", *eval_args(model_dir, "--setting", f"weights:{folder / 'my_plan.json'}"))
    records = (folder / "records.jsonl").read_bytes()
    run_in(folder, "eval", *eval_args(model_dir, "--setting", f"weights:{folder / 'my_plan.json'}"))  # resumes
    assert (folder / "records.jsonl").read_bytes() == records
    run_in(folder, "scan", *scan_args(model_dir, "--no-end-to-end"))
    run_in(folder, "formats", model_dir, "--formats", "mxfp4")
    text = run_in(folder, "train", train_config(tmp_path, model_dir, folder), expect=(2,))  # eval's run.json
    assert "'run.json'" in text
    run_in(folder, "eval", *eval_args(model_dir), "--overwrite")  # replaces its own outputs only
