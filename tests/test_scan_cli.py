"""`hwnoise scan` as a user runs it (issue 5, "It must show" 1 and 6): files, table, recommendation,
clear errors with exit code 2, and an output directory written atomically."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, bit_identical, snapshot, tiny_llama  # noqa: E402

from hwnoise.cli import app  # noqa: E402

runner = CliRunner()
FILES = ["faults.json", "scan.html", "scan.json", "scan_deadzone.png", "scan_end_to_end.png", "scan_saturation.png",
         "scan_sqnr.png", "sigma_multipliers.json"]


@pytest.fixture
def tiny(monkeypatch):
    """`load()` returns a tiny Llama and a byte tokenizer: the CLI path without the bundled model."""
    import hwnoise.models

    monkeypatch.setenv("HWNOISE_COMPILE", "0")
    model = tiny_llama()
    monkeypatch.setattr(hwnoise.models, "load", lambda spec, **kw: (model, ByteTokenizer()))
    return model


def test_scan_writes_all_files_and_prints_table_and_recommendation(tiny, tmp_path):
    before = snapshot(tiny)
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny", "--format", "mxfp4", "--out", str(out), "--faults", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert "Worst decoder layers" in result.output and "Recommendation:" in result.output
    assert "Fault scan" in result.output
    data = json.loads((out / "scan.json").read_text())
    assert data["summary"]["modules"] == 22 and data["summary"]["decoder_layers"] == 3
    assert data["model"] == "tiny" and data["faults"]["config_b"] == "mxfp4"
    multipliers = json.loads((out / "sigma_multipliers.json").read_text())
    assert set(multipliers) == {"layer_multipliers", "default_multiplier", "targeted"}
    assert bit_identical(tiny, before)
    assert [p.name for p in tmp_path.iterdir()] == ["scan"]  # no temporary directory left


def test_scan_texts_file_samples_and_input_mode(tiny, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"calibration text number {i} with some words" for i in range(6)))
    result = runner.invoke(app, ["scan", "tiny", "--where", "input", "--texts", str(texts), "--samples", "3",
                                 "--no-end-to-end", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert data["texts"] == 3 and data["mode"] == "input" and data["end_to_end"] is False
    assert not (tmp_path / "o" / "scan_end_to_end.png").exists()


@pytest.mark.parametrize("args, words", [
    (["--format", "mxfp5"], ["mxfp5", "mxfp4"]),
    (["--where", "output"], ["output", "weight"]),
    (["--thresholds", "sqnr_db=-3"], ["sqnr_db", "out of range"]),
    (["--thresholds", "deadzone_ratio=7"], ["deadzone_ratio", "[0, 1]"]),
    (["--thresholds", "sqnr=20"], ["unknown threshold"]),
    (["--samples", "0"], ["samples"]),
])
def test_bad_options_exit_2_before_any_work(tmp_path, args, words, monkeypatch):
    import hwnoise.models

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for a bad option")

    monkeypatch.setattr(hwnoise.models, "load", no_load)
    result = runner.invoke(app, ["scan", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for word in words:
        assert word in text
    assert not (tmp_path / "o").exists()


def test_empty_texts_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["scan", "--texts", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds no text" in " ".join(result.output.split())
    result = runner.invoke(app, ["scan", "--texts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())


def test_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    result = runner.invoke(app, ["scan", str(missing), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no_such_model" in result.output.replace("\n", "")
    assert not (tmp_path / "o").exists()


def test_interrupted_scan_leaves_no_file(tiny, tmp_path, monkeypatch):
    from hwnoise.scan import core

    real, calls = core.tensor_stats, []

    def interrupt_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "tensor_stats", interrupt_midway)
    before = snapshot(tiny)
    result = runner.invoke(app, ["scan", "tiny", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert list(tmp_path.iterdir()) == []
    assert bit_identical(tiny, before)


def test_interrupted_write_keeps_the_previous_scan_whole(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert runner.invoke(app, ["scan", "tiny", "--no-end-to-end", "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from hwnoise.scan import views

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(views, "html_page", fail)  # after scan.json and the plots are in the temporary dir
    result = runner.invoke(app, ["scan", "tiny", "--format", "nvfp4", "--no-end-to-end", "--out", str(out)])
    assert result.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
