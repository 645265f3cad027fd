"""Issue 25 on the bundled model (slow): `hwnoise mismatch` end to end, piped -- progress lines,
mismatch.json and mismatch.png written, the clean setting exactly 0, MXFP4 above it."""

import json

import pytest


@pytest.mark.slow
def test_cli_on_the_bundled_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hwnoise.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["mismatch", "default", "-r", "clean", "-r", "weights:mxfp4", "--n", "2",
                                      "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sample weights:mxfp4" in result.output and "score weights:mxfp4" in result.output  # piped progress
    data = json.loads((out / "mismatch.json").read_text())
    by = {s["spec"]: s for s in data["settings"]}
    assert by["clean"]["metrics"]["abs_logp_diff"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert by["weights:mxfp4"]["metrics"]["abs_logp_diff"]["mean"] > 1e-3
    assert [r["spec"] for r in data["ranking"]] == ["weights:mxfp4", "clean"]
    assert data["identity"]["model"] == "default" and data["identity"]["dtype"] == "fp32"
    assert (out / "mismatch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
