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

