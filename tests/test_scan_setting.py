"""Issue 21: the scan measures an Emulation, one module at a time (``hn.scan(model, tok, SETTING)``,
``hwnoise scan --setting``); issue 20 items 3 (a scan deletes nothing it does not write), 4 (scan
part: dtype and device recorded, compare refuses mixed ones) and 7 (plan targets refused before work)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, independent_effect, tiny_llama  # noqa: E402

import hwnoise as hn  # noqa: E402
from hwnoise.scan.calibration import tokenize  # noqa: E402

TEXTS = ["the cat sat on the mat", "one two three four five", "a b c d e f g h"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def _rows(report):
    return [(r.name, r.sqnr_db, r.deadzone_ratio, r.saturation_ratio, r.relative_error, r.kl, r.loss_increase)
            for r in report.rows]


def test_a_setting_and_its_shorthand_scan_the_same(model):
    tok = ByteTokenizer()
    for setting, kwargs in (("weights:mxfp4", {"format": "mxfp4"}), ("inputs:nvfp4", {"format": "nvfp4", "where": "input"})):
        a = hn.scan(model, tok, setting, texts=TEXTS)
        b = hn.scan(model, tok, texts=TEXTS, **kwargs)
        assert _rows(a) == _rows(b) and a.whole_model == b.whole_model
        assert a.setting == setting and a.mode == ("weight" if "weights" in setting else "input")
    assert a.rows and all(r.sqnr_db < 40 for r in a.rows)  # something was measured


def test_a_plan_setting_scans_each_module_in_its_planned_format(model, tmp_path):
    tok = ByteTokenizer()
    plan = {"model.layers.0.mlp.down_proj": "mxfp8_e4m3", "model.layers.1.self_attn.q_proj": "mxfp4"}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    report = hn.scan(model, tok, f"weights:{path}", texts=TEXTS)
    assert [r.name for r in report.rows] == list(plan)  # the plan's modules, not every linear
    for name, fmt in plan.items():  # each as the one-format scan of that module measures it
        alone = hn.scan(model, tok, f"weights:{fmt}", texts=TEXTS, targets=name)
        (row,), mine = alone.rows, next(r for r in report.rows if r.name == name)
        assert (row.sqnr_db, row.kl, row.loss_increase) == (mine.sqnr_db, mine.kl, mine.loss_increase)
    down = next(r for r in report.rows if r.name.endswith("down_proj"))
    q = next(r for r in report.rows if r.name.endswith("q_proj"))
    assert down.sqnr_db > q.sqnr_db + 10  # mxfp8 really kept more than mxfp4


def test_module_level_noise_scans_per_module_and_matches_an_independent_forward(model):
    tok = ByteTokenizer()
    report = hn.scan(model, tok, "absolute:0.05@output+targets:*.mlp.down_proj", texts=TEXTS)
    assert report.mode == "output" and report.format == "absolute:0.05"
    assert [r.name for r in report.rows] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert all(r.kl > 0 and math.isfinite(r.sqnr_db) and r.saturation_ratio == 0 for r in report.rows)
    # The same noise put on by a plain hook, measured with two full forwards.
    from hwnoise.errors import AbsoluteGaussian, noise_key

    name = report.rows[0].name
    module = model.get_submodule(name)
    batch = tokenize(tok, TEXTS, 16)

    class Noise:
        def __enter__(self):
            self.h = module.register_forward_hook(
                lambda m, a, out: AbsoluteGaussian(0.05).apply(out, noise_key(0, name, "forward", 0)))

        def __exit__(self, *exc):
            self.h.remove()

    loss, kl = independent_effect(model, batch, Noise)
    assert report.rows[0].kl == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert report.rows[0].loss_increase == pytest.approx(loss, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("setting, words", [
    ("relative:0.05@ops", "every op of the model"),
    ("aqn:0.01", "AQN"),
    ("clean", "changes nothing"),
    ("weights:mxfp4+inputs:mxfp4", "2 parts"),
])
def test_settings_a_per_module_scan_cannot_measure_are_refused_by_name(setting, words):
    class NoModel(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("no forward may run")

    with pytest.raises(ValueError, match=words):
        hn.scan(NoModel(), ByteTokenizer(), setting, texts=TEXTS)


def test_texts_given_where_the_setting_goes_get_a_clear_error(model):
    with pytest.raises(ValueError, match="texts="):
        hn.scan(model, ByteTokenizer(), TEXTS)


def _cli(args, tmp_path, monkeypatch):
    import hwnoise.models
    from typer.testing import CliRunner

    from hwnoise.cli import app

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(hwnoise.models, "load", no_load)
    result = CliRunner().invoke(app, ["scan", "tiny", "--out", str(tmp_path / "o"), *args])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("args, words", [
    (["--setting", "relative:0.05@ops"], "cannot scan"),
    (["--setting", "aqn:0.01"], "AQN"),
    (["--setting", "weights:mxfp4", "--format", "nvfp4"], "not both"),
    (["--setting", "weights:missing.json"], "not found"),
    # issue 20 item 7: plan targets refused before the scan (and before the model loads)
    (["--plan", "bf16", "--budget-bits", "2"], "below the cheapest plan"),
    (["--plan", ""], "names no candidate formats"),
    (["--plan", "bf16", "--target-kl", "-1"], "finite number >= 0"),
    (["--plan", "bf16", "--target-kl", "nan"], "finite number >= 0"),
    (["--plan", "bf16", "--budget-bits", "inf"], "finite number >= 0"),
    (["--setting", "inputs:mxfp4", "--plan", "bf16"], "one weight format"),
])
def test_cli_scan_setting_and_plan_refusals_come_before_the_model_loads(args, words, tmp_path, monkeypatch):
    code, output = _cli(args, tmp_path, monkeypatch)
    assert code == 2 and words in output, output


def test_scan_plan_bf16_budget_bits_2_is_refused_before_work(model):
    with pytest.raises(ValueError, match="below the cheapest plan"):
        hn.scan(model, ByteTokenizer(), texts=TEXTS, plan="bf16", budget_bits=2)
    with pytest.raises(ValueError, match="finite number"):
        hn.scan(model, ByteTokenizer(), texts=TEXTS, plan="bf16", target_kl=-1)


def test_scan_plan_empty_string_is_refused(model):
    with pytest.raises(ValueError, match="names no candidate formats"):
        hn.scan(model, ByteTokenizer(), texts=TEXTS, plan="")


# -- issue 20 item 3: a scan deletes nothing it does not write -------------------------------------

def test_scan_without_plan_keeps_plan_json_plan_sigma_multipliers_and_scan_plan_png(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"plan.json": b'{"model.layers.0.mlp.down_proj": "bf16"}', "plan_sigma_multipliers.json": b"{}",
               "scan_plan.png": b"\x89PNG earlier plan plot"}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    report = hn.scan(model, ByteTokenizer(), texts=TEXTS, end_to_end=False)
    report.save(out, plots=False)
    for name, data in earlier.items():
        assert (out / name).read_bytes() == data, name
    assert "plan.json" not in report.written and "scan.json" in report.written


def test_scan_without_faults_keeps_faults_json(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "faults.json").write_text('{"config_a": "bf16"}')
    hn.scan(model, ByteTokenizer(), texts=TEXTS, end_to_end=False).save(out, plots=False)
    assert (out / "faults.json").read_text() == '{"config_a": "bf16"}'


# -- issue 20 item 4 (scan part): dtype and device recorded; compare refuses mixed ones ------------

def test_scan_json_records_dtype_and_device_and_compare_refuses_different_dtypes(model):
    tok = ByteTokenizer()
    a = hn.scan(model, tok, texts=TEXTS, end_to_end=False)
    data = a.to_json()
    assert data["dtype"] == "float32" and data["device"] == "cpu" and data["setting"] == "weights:mxfp4"
    assert hn.ScanReport.from_json(data).dtype == "float32"
    b = hn.ScanReport.from_json(dict(data, dtype="bfloat16"))
    with pytest.raises(ValueError, match="different dtype: float32 and bfloat16"):
        a.compare(b)
    with pytest.raises(ValueError, match="different device"):
        a.compare(hn.ScanReport.from_json(dict(data, device="cuda:0")))
    assert a.compare(hn.ScanReport.from_json(data))["modules_in_both"] == len(a.rows)
