"""The names of issue 11 for formats / metrics / scan / eval: the new ones work, the old ones still
work for one release and warn with HwnoiseDeprecationWarning."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, tiny_llama  # noqa: E402

import hwnoise as hn  # noqa: E402
from hwnoise.compat import HwnoiseDeprecationWarning  # noqa: E402
from hwnoise.formats import decode, encode, get  # noqa: E402

X = torch.randn(4, 64)
TEXTS = ["the cat sat on the mat", "one two three four"]


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")


def test_format_keyword_and_the_old_fmt():
    y = hn.quantize(X, format="nvfp4")
    assert torch.equal(y, hn.quantize(X, "nvfp4"))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"fmt= is deprecated.*use format="):
        assert torch.equal(hn.quantize(X, fmt="nvfp4"), y)
    with pytest.warns(HwnoiseDeprecationWarning, match="fmt="):
        assert torch.equal(encode(X, fmt="mxfp4").codes, encode(X, format="mxfp4").codes)
    with pytest.warns(HwnoiseDeprecationWarning, match="fmt="):
        old = hn.metrics.saturation_ratio(X, y, fmt="nvfp4")
    assert old == hn.metrics.saturation_ratio(X, y, format="nvfp4")
    with pytest.raises(TypeError, match="both 'fmt'.*and 'format'"):
        hn.quantize(X, fmt="mxfp4", format="mxfp4")


def test_formatspec_methods_warn_and_match_the_functions():
    spec = get("mxfp4")
    with pytest.warns(HwnoiseDeprecationWarning, match=r"FormatSpec.quantize\(x\).*hwnoise.formats.quantize"):
        assert torch.equal(spec.quantize(X), hn.quantize(X, spec))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"FormatSpec.encode"):
        enc = spec.encode(X)
    with pytest.warns(HwnoiseDeprecationWarning, match=r"FormatSpec.decode"):
        assert torch.equal(spec.decode(enc), decode(encode(X, spec)))


@pytest.mark.parametrize("module, old, new", [
    ("hwnoise.formats.hif4", "ROUNDING_MODES", "HIF4_ROUNDING_MODES"),
    ("hwnoise.scan", "MODES", "WHERE"),
    ("hwnoise.scan.core", "MODES", "WHERE"),
    ("hwnoise.scan.report", "METRICS", "LAYER_METRICS"),
    ("hwnoise.eval", "METRICS", "ANSWER_METRICS"),
    ("hwnoise.eval.report", "METRICS", "ANSWER_METRICS"),
    ("hwnoise.eval", "RUN_FILE", "EVAL_RUN_FILE"),
    ("hwnoise.eval.core", "RUN_FILE", "EVAL_RUN_FILE"),
])
def test_renamed_module_attributes(module, old, new):
    m = importlib.import_module(module)
    assert old not in vars(m)
    with pytest.warns(HwnoiseDeprecationWarning, match=f"{module}.{old} is deprecated.*{new}"):
        assert getattr(m, old) == getattr(m, new)


@pytest.mark.parametrize("old_module, name, new_module", [
    ("hwnoise.report.scan_views", "html_page", "hwnoise.scan.views"),
    ("hwnoise.report.scan_views", "plan_table", "hwnoise.scan.views"),
    ("hwnoise.report.eval_views", "render_png", "hwnoise.eval.views"),
    ("hwnoise.report.files", "atomic_write_json", "hwnoise.io"),
])
def test_moved_view_and_file_modules(old_module, name, new_module):
    old = importlib.import_module(old_module)
    with pytest.warns(HwnoiseDeprecationWarning, match=f"{old_module}.{name} is deprecated.*{new_module}.{name}"):
        assert getattr(old, name) is getattr(importlib.import_module(new_module), name)


def test_moved_view_shims_do_not_import_the_new_layer():
    import subprocess

    code = ("import sys, hwnoise.report.scan_views, hwnoise.report.eval_views; "
            "print(all(hasattr(sys.modules[m], '__getattr__') for m in "
            "('hwnoise.report.scan_views', 'hwnoise.report.eval_views')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "hwnoise" / "report"
    for name in ("scan_views.py", "eval_views.py", "files.py"):
        tree = ast.parse((src / name).read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= {"compat", "__future__"}, (name, imported)


def test_scan_where_and_progress_and_the_old_mode_and_on_step():
    model, tok = tiny_llama(layers=1), ByteTokenizer()
    progress, steps = [], []
    new = hn.scan(model, tok, TEXTS, where="input", on_progress=lambda *a: progress.append(a))
    with pytest.warns(HwnoiseDeprecationWarning) as caught:
        old = hn.scan(model, tok, TEXTS, mode="input", on_step=lambda *a: steps.append(a))
    assert {"mode=", "on_step(phase, name)"} <= {str(w.message).split(" is deprecated")[0] for w in caught}
    assert old.mode == new.mode == "input" and [r.sqnr_db for r in old.rows] == [r.sqnr_db for r in new.rows]
    n = len(new.rows)
    assert len(progress) == len(steps) == 2 * n
    assert progress[0] == (f"metrics {new.rows[0].name}", 1, n) and progress[-1][1:] == (n, n)
    assert steps[0] == ("metrics", new.rows[0].name) and steps[-1][0] == "end_to_end"


def test_scan_faults_format_a_b_and_the_old_config_a_b():
    model, tok = tiny_llama(layers=2), ByteTokenizer()
    new = hn.scan_faults(model, tok, TEXTS, format_a="bf16", format_b="mxfp4", repeats=1)
    with pytest.warns(HwnoiseDeprecationWarning, match="config_a="):
        old = hn.scan_faults(model, tok, TEXTS, config_a="bf16", format_b="mxfp4", repeats=1)
    assert new.format_a == "bf16" and new.format_b == "mxfp4"
    assert new.to_json()["config_a"] == "bf16"  # JSON keys unchanged (saved scans read the same)
    assert [l.gain_b for l in old.layers] == [l.gain_b for l in new.layers]


def test_survey_on_progress_and_the_old_on_step():
    from hwnoise.formats.survey import survey_formats

    weights = {"a": torch.randn(8, 64), "b": torch.randn(4, 64)}
    progress, steps = [], []
    survey_formats(weights, ["mxfp4", "bf16"], on_progress=lambda *a: progress.append(a))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"on_step\(phase, name\)"):
        survey_formats(weights, ["mxfp4", "bf16"], on_step=lambda *a: steps.append(a))
    assert progress == [("mxfp4 a", 1, 2), ("mxfp4 b", 2, 2), ("bf16 a", 1, 2), ("bf16 b", 2, 2)]
    assert steps == [("mxfp4", "a"), ("mxfp4", "b"), ("bf16", "a"), ("bf16", "b")]


def test_cli_scan_where_and_the_hidden_deprecated_mode(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hwnoise.cli import app

    result = CliRunner().invoke(app, ["scan", "--help"])
    assert "--where" in result.output and "--mode" not in result.output
    import hwnoise.models

    def no_load(*a, **k):
        raise AssertionError("not loaded for a bad option")

    monkeypatch.setattr(hwnoise.models, "load", no_load)
    result = CliRunner().invoke(app, ["scan", "--out", str(tmp_path / "o"), "--mode", "output"])
    assert result.exit_code == 2 and "--mode is deprecated" in result.output and "output" in result.output
