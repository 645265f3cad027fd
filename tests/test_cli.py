"""The `hwnoise` command as a user runs it."""

import json

import pytest
from typer.testing import CliRunner

from hwnoise.cli import app

runner = CliRunner()


def test_formats_list_names_every_format():
    result = runner.invoke(app, ["formats", "--list"])
    assert result.exit_code == 0
    for name in ("mxfp4", "nvfp4", "hif4", "mxfp8_e4m3", "fp8_e5m2", "mxfp4_2d"):
        assert name in result.output


def test_formats_unknown_format_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["formats", "--formats", "mxfp4,mxfp5", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "mxfp5" in result.output and "mxfp4" in result.output
    assert not (tmp_path / "formats.json").exists()


def test_formats_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    result = runner.invoke(app, ["formats", str(missing), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "no_such_model" in result.output


@pytest.mark.slow
def test_formats_on_the_bundled_model_writes_json(tmp_path):
    result = runner.invoke(app, ["formats", "--formats", "mxfp4,mxfp8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "formats.json").read_text())
    assert data["layers"] == 211 and set(data["formats"]) == {"mxfp4", "mxfp8"}
    mx4, mx8 = data["formats"]["mxfp4"], data["formats"]["mxfp8"]
    assert len(mx4["layers"]) == 211
    assert mx8["sqnr_db_total"] > mx4["sqnr_db_total"] + 5  # 8-bit elements beat 4-bit ones
    assert 0 < mx4["deadzone_ratio"] < 0.5 and "Q4_1" in data["note"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind



@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_train_prints_progress_between_evaluations_when_not_a_terminal(tmp_path, monkeypatch):
    """Piped or under nohup, `hwnoise train` printed nothing between evaluations (issue 13): now a
    plain line per step, with that step's reward. A tiny Llama stands in for the bundled model."""
    import sys
    import warnings
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(Path(__file__).parent))
    from test_rl_trainer import tiny_model

    import hwnoise.models
    import hwnoise.rl

    _, tokenizer = hwnoise.models.load("default")
    model = tiny_model(tokenizer)
    real = hwnoise.rl.train
    monkeypatch.setattr(hwnoise.rl, "train", lambda cfg, **kw: real(cfg, model=model, tokenizer=tokenizer, **kw))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "steps": 4, "seed": 0, "data": {"train": "arith:level=1", "n_train": 16, "n_eval": 2},
        "algorithm": {"num_generations": 2, "batch_size": 2, "max_completion_length": 8},
        "eval": {"max_new_tokens": 4, "batch_size": 2, "at_start": False, "every": 4},
        "logging": {"report_to": ["none"]},
    }))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1", "step 2", "step 3", "step 4"], result.output
    assert all("reward" in line and "/4 (" in line for line in lines), result.output
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
                    and "transformers" in (w.filename or "") + str(w.message)]
    assert not deprecations, deprecations  # hwnoise passes the new names; TRL's use of the old ones is silenced
