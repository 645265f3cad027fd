"""`hwnoise eval` through typer's CliRunner on a tiny model saved to a directory."""

from __future__ import annotations

import json

import pytest
from test_eval import char_tokenizer, tiny_model
from typer.testing import CliRunner

import hwnoise.cli.eval  # noqa: F401  (registers the command, whether or not cli/__init__ imports it yet)
from hwnoise.cli import app
from hwnoise.cli.eval import settings_from_options

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def run(*args):
    result = runner.invoke(app, ["eval", *map(str, args)])
    return result, " ".join(result.output.split())  # rich wraps long lines


def test_eval_command_writes_everything_and_resumes(model_dir, tmp_path):
    out = tmp_path / "out"
    args = (model_dir, "--data", "arith", "--n", 4, "--noise", "0,0.1,0.3", "--format", "nvfp4", "--aqn", "0.01",
            "--max-new-tokens", 3, "--batch-size", 2, "--out", out)
    result, text = run(*args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"eval.json", "eval.png", "records.jsonl", "run.json"}
    data = json.loads((out / "eval.json").read_text())
    assert [s["spec"] for s in data["settings"]] == ["clean", "relative:0.1@ops", "relative:0.3@ops",
                                                      "weights:nvfp4", "aqn:0.01"]
    assert len((out / "records.jsonl").read_text().splitlines()) == 4 * 5
    assert "relative 0.3 @ops" in text and "wrote" in text
    # a rerun finds every record and generates nothing: same results
    records = (out / "records.jsonl").read_bytes()
    again, _ = run(*args)
    assert again.exit_code == 0, again.output
    assert (out / "records.jsonl").read_bytes() == records
    rerun = json.loads((out / "eval.json").read_text())
    rerun.pop("seconds"), data.pop("seconds")
    assert rerun == data
    # other options into the same directory: refused, with the way out named
    result, text = run(model_dir, "--data", "arith", "--n", 4, "--noise", "0,0.1", "--max-new-tokens", 3,
                       "--batch-size", 2, "--out", out)
    assert result.exit_code == 2 and "settings" in text and "--overwrite" in text


@pytest.mark.parametrize("args,message", [
    (("--noise", "0,abc"), "bad noise level 'abc'"),
    (("--noise", "0,-0.1"), "expected a finite number >= 0"),
    (("--where", "gpu"), "unknown --where 'gpu'; known: ops, input, output, weight"),
    (("--error", "gaussian"), "unknown --error 'gaussian'; known: relative"),
    (("--format", "mxfp5"), "mxfp5"),
    (("--setting", "relative:0.05@somewhere"), "unknown where 'somewhere'"),
    (("--metric", "exact"), "unknown --metric 'exact'"),
    (("--batch-size", "0"), "--batch-size must be >= 1"),
    (("--data", "arith", "--n", "0"), "--n must be >= 1"),
    (("--threads", "0"), "--threads must be >= 1"),
    (("--data", "nosuch"), "unknown spec 'nosuch'"),
])
def test_bad_options_exit_2_before_loading_the_model(tmp_path, args, message):
    result, text = run(tmp_path / "no-such-model", "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in text
    assert "no-such-model" not in text  # refused before the model was looked at


def test_bad_data_files_exit_2(tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(3)))
    result, text = run(tmp_path / "no-such-model", "--data", few, "--n", 10, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "n=10" in text and "only 3" in text
    fields = tmp_path / "fields.jsonl"
    fields.write_text(json.dumps({"prompt": "1 + 1?", "answer": "#### 2"}) + "\n")
    result, text = run(tmp_path / "no-such-model", "--data", fields, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "question" in text


def test_settings_from_options():
    assert settings_from_options("0,0.05,0.2", "ops", "relative", "nvfp4,mxfp4", "0.01", ["absolute:1e-3@input"]) == [
        "clean", "relative:0.05@ops", "relative:0.2@ops", "weights:nvfp4", "weights:mxfp4", "aqn:0.01",
        "absolute:1e-3@input"]
    assert settings_from_options("0.1", "output", "absolute", None, None, None) == ["clean", "absolute:0.1@output"]
    assert settings_from_options(None, "ops", "relative", None, None, ["clean"]) == ["clean"]
    # Levels are written exactly, not rounded to 6 digits ("{:g}" would make 0.1234567 into 0.123457).
    assert settings_from_options("0.1234567", "ops", "relative", None, "0.00123456789", None) == [
        "clean", "relative:0.1234567@ops", "aqn:0.00123456789"]


def test_sigkill_halfway_then_rerun_gives_the_uninterrupted_results(model_dir, tmp_path):
    """A real kill (SIGKILL of the CLI process as soon as some records are on disk), then a rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [model_dir, "--data", "arith", "--n", 8, "--noise", "0,0.1,0.3", "--max-new-tokens", 24,
            "--batch-size", 2]
    killed = tmp_path / "killed"
    code = "import sys; from hwnoise.cli import app; sys.argv[0] = 'hwnoise'; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, "eval", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    records = killed / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = records.read_bytes().count(b"\n")
    assert 3 <= done < 8 * 3 and not (killed / "eval.json").exists()

    result, _ = run(*args, "--out", killed)
    assert result.exit_code == 0, result.output
    full = tmp_path / "full"
    result, _ = run(*args, "--out", full)
    assert result.exit_code == 0, result.output
    assert sorted(records.read_text().splitlines()) == sorted((full / "records.jsonl").read_text().splitlines())
    a, b = (json.loads((d / "eval.json").read_text()) for d in (killed, full))
    a.pop("seconds"), b.pop("seconds")
    assert a == b
