"""benchmarks/findings.py: argument checks, the statistics and verdict rules, the problem set with
worked examples, the whole F1-F4 pipeline on a tiny Llama (JSON first), and the Markdown/PNG views
rebuilt from the JSON alone (--render-only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import findings  # noqa: E402
from test_eval import char_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")  # tiny tensors: eager is as fast and compiles nothing


# -- arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    ([], "--out"),
    (["--out", "x", "--n", "0"], "--n must be >= 1; got 0"),
    (["--out", "x", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1; got -3"),
    (["--out", "x", "--shots", "-1"], "--shots must be >= 0; got -1"),
    (["--out", "x", "--only", "F1,F9"], "unknown finding(s) ['F9']; known: F1, F2, F3, F4"),
    (["--out", "x", "--device", "tpu"], "--device must be 'cpu' or 'cuda'; got 'tpu'"),
    (["--out", "x", "--f4-sigmas", "0.1"], "--f4-sigmas: expected a subset of 0.05,0.005; got '0.1'"),
])
def test_bad_arguments_are_refused_naming_the_value(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        findings.parse_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_modes_set_the_problem_count():
    assert findings.parse_args(["--out", "x", "--quick"]).n == findings.MODES["quick"]["n"]
    full = findings.parse_args(["--out", "x"])
    assert full.n == findings.MODES["full"]["n"] >= 100  # the issue asks >= 100 problems per setting
    assert full.only == ("F1", "F2", "F3", "F4")
    assert findings.parse_args(["--out", "x", "--n", "7", "--only", "f3"]).only == ("F3",)


# F5 (--train): tests/test_findings_train.py


# -- statistics and verdicts -------------------------------------------------------------------

def test_paired_interval_against_hand_computed_values():
    a = np.array([3.0, 5.0, 4.0, 6.0, 7.0, 5.0, 4.0, 6.0, 5.0, 8.0])
    b = a - np.arange(1, 11) / 10  # a - b = 0.1 .. 1.0, all positive
    iv = findings.paired_mean_interval(a, b)
    assert iv["mean_diff"] == pytest.approx(0.55)
    assert iv["mean_a"] == pytest.approx(5.3) and iv["n"] == 10
    assert 0.1 < iv["ci"][0] < 0.55 < iv["ci"][1] < 1.0
    # exact Wilcoxon signed-rank, all 10 signs positive: p = 2 / 2**10
    assert iv["wilcoxon_p"] == pytest.approx(2 / 1024)
    assert iv["share_a_greater"] == 1.0
    assert findings.direction(iv, +1) == "as claimed" and findings.direction(iv, -1) == "opposite"
    flat = findings.paired_mean_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert flat["ci"] == [0.0, 0.0] and flat["wilcoxon_p"] == 1.0 and findings.direction(flat, +1) == "unclear"


def test_unpaired_interval_and_nan_skipping():
    iv = findings.unpaired_mean_interval([1.0, 1.2, 0.8, float("nan")], [0.0, 0.1, -0.1])
    assert iv["n_a"] == 3 and iv["mean_diff"] == pytest.approx(1.0)
    assert iv["ci"][0] > 0.5 and iv["welch_p"] < 0.01
    with pytest.raises(ValueError, match="at least 2 finite"):
        findings.unpaired_mean_interval([1.0], [1.0, 2.0])


def _cmp(drop, p, acc_clean=20.0, ci=(-1.0, 1.0), exact=None, n_needed=None):
    return {"drop": drop, "mcnemar_p": p, "drop_ci": list(ci), "exact_drop_ci": exact, "clean_accuracy": acc_clean,
            "accuracy": acc_clean - drop, "n_needed": n_needed}


def test_verdict_rules():
    # "unchanged": not significant and the whole interval within +-3 pts
    assert findings._verdict_unchanged(_cmp(0.0, 1.0, ci=(-2, 2), exact=(-2.5, 2.5))) == "reproduced in direction"
    assert findings._verdict_unchanged(_cmp(1.0, 0.5, ci=(-2, 4))) == "inconclusive"
    assert findings._verdict_unchanged(_cmp(1.0, 0.5, ci=(-2, 2), exact=(-2, 3.5))) == "inconclusive"  # hull
    assert findings._verdict_unchanged(_cmp(8.0, 0.01, ci=(3, 12))) == "not reproduced"
    # "degrades clearly": a significant drop
    assert findings._verdict_degrades(_cmp(10.0, 0.001)) == "reproduced in direction"
    assert findings._verdict_degrades(_cmp(2.0, 0.3)) == "inconclusive"
    assert findings._verdict_degrades(_cmp(-6.0, 0.01)) == "not reproduced"
    # "collapse": significant and down to <= a quarter of clean accuracy
    assert findings._verdict_collapse(_cmp(19.0, 1e-5, acc_clean=20.0)) == "reproduced in direction"
    assert findings._verdict_collapse(_cmp(8.0, 0.01, acc_clean=20.0)) == "partly (degrades, no collapse)"
    assert findings._overall(["reproduced in direction"] * 2) == "reproduced in direction"
    assert findings._overall(["reproduced in direction", "inconclusive"]) == "partly reproduced (rest inconclusive)"
    assert findings._overall(["not reproduced", "not reproduced"]) == "not reproduced"


def test_worked_examples_come_from_the_train_split_without_calculator_marks():
    from hwnoise.data import load_problems

    plain = findings.build_problems("arith:level=1", 3, 0)
    shot = findings.build_problems("arith:level=1", 3, 1)
    test = load_problems("arith:level=1", n=3)
    example = load_problems("arith:level=1", n=1, split="train")[0]
    assert [p["id"] for p in shot] == [p.id for p in test] and [p["gold"] for p in shot] == [p.gold for p in test]
    assert [p["question"] for p in plain] == [p.question for p in test]
    for p, t in zip(shot, test):
        assert p["question"].startswith(f"Question: {example.question}\nAnswer: ")
        assert p["question"].endswith(f"Question: {t.question}")
        assert "<<" not in p["question"] and f"#### {example.gold}" in p["question"]
    assert example.question not in [t.question for t in test]


# -- the pipeline on a tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("findings")
    args = findings.parse_args(["--out", str(out), "--n", "3", "--max-new-tokens", "3", "--batch-size", "2",
                                "--shots", "1", "--model", "tiny"])  # two chunks: 2 problems, then 1
    model, tok = tiny_model(), char_tokenizer()
    data = {"schema_version": findings.SCHEMA_VERSION, "model": "tiny", "mode": "test", "claims": findings.CLAIMS,
            "environment": {"nproc": 2, "torch_threads": 1, "device": "cpu"}, "wall_seconds": 1.0,
            "F1": findings.measure_f1(model, tok, samples=2), "F2": findings.measure_f2(model, tok, samples=2),
            "eval": findings.evaluate_runs(model, tok, args, out, log=lambda msg: None)}
    findings.write_json(out / findings.JSON_FILE, data)
    return out, data, model


def test_f1_f2_pair_the_same_modules(measured):
    _, data, model = measured
    f1, f2 = data["F1"], data["F2"]
    linears = sum(isinstance(m, __import__("torch").nn.Linear) for m in model.modules())
    assert f1["modules"] == linears and f2["modules"] == linears
    assert [r["name"] for r in f1["rows"]["nvfp4"]] == [r["name"] for r in f1["rows"]["mxfp4"]]
    for metric in findings.F1_METRICS:
        iv = f1["paired"][metric]
        mean_a = np.mean([r[metric] for r in f1["rows"]["nvfp4"]])
        assert iv["mean_a"] == pytest.approx(mean_a) and iv["direction"] in ("as claimed", "opposite", "unclear")
    row = f1["rows"]["mxfp4"][0]
    assert row["mse"] > 0 and 0 < row["relative_error"] < 1
    assert f1["verdict"] in ("reproduced in direction", "not reproduced", "inconclusive")
    assert f2["paired_relative_error"]["n"] == linears


def test_f3_f4_run_every_setting_on_the_same_problems(measured):
    out, data, _ = measured
    ev = data["eval"]
    specs = [s["spec"] for s in ev["F3"]["eval"]["settings"]]
    assert specs == ["clean", *findings.F3_SETTINGS]
    assert [r["setting"] for r in ev["F3"]["rows"]] == list(findings.F3_SETTINGS)
    rows = {r["name"]: r for r in ev["F4"]["rows"]}
    assert set(rows) == {f"aqn-{t}-{s:g}" for t in findings.F4_LAYER_TYPES for s in findings.F4_SIGMAS}
    for r in rows.values():
        assert r["n"] == 3 and r["comparison"]["strict"]["n"] == 3
        assert r["parameters_noised"] > 0
        # the noise really landed: relative std on linear weights, absolute on RMSNorm weights (fp32: no cast)
        assert r["mean_effective_std"] == pytest.approx(r["sigma"], rel=0.2)
        assert (out / "runs" / r["name"] / "chunk-000" / "records.jsonl").is_file()
    assert rows["aqn-linear-0.05"]["parameters_noised"] != rows["aqn-rmsnorm-0.05"]["parameters_noised"]
    entropy = rows["aqn-linear-0.05"]["entropy"]
    assert entropy["n_a"] == 2 and entropy["mean_b"]  # the first chunk (2 problems) == pytest.approx(ev["F4"]["clean_entropy"])


def test_render_only_rebuilds_the_views_from_the_json(measured, tmp_path):
    out, data, _ = measured
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / findings.JSON_FILE).write_text((out / findings.JSON_FILE).read_text())
    assert findings.main(["--out", str(copy), "--render-only"]) == 0
    md = (copy / findings.MD_FILE).read_text()
    for heading in ("### F1", "### F2", "### F3", "### F4"):
        assert heading in md
    assert f"`{findings.F3_DEGRADES}`" in md and data["F1"]["verdict"] in md
    assert md.count("| linear |") == len(findings.F4_SIGMAS)
    for png in ("f1_nvfp4_vs_mxfp4.png", "f2_inputs_vs_weights.png", "f3_f4_accuracy.png"):
        assert (copy / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(copy.glob("*.tmp*"))


def test_render_only_without_json_fails_clearly(tmp_path, capsys):
    assert findings.main(["--out", str(tmp_path), "--render-only"]) == 2
    assert f"nothing to render in {tmp_path}" in capsys.readouterr().err


def test_rerun_resumes_from_the_records(measured, monkeypatch):
    """A second run over the same directory regenerates nothing: every batch is recorded."""
    import hwnoise.engines.hf as hf  # the HF evaluation engine's generation call

    out, data, _ = measured
    calls = []
    monkeypatch.setattr(hf, "generate_greedy", lambda *a, **k: calls.append(1) or [])
    args = findings.parse_args(["--out", str(out), "--n", "3", "--max-new-tokens", "3", "--batch-size", "2",
                                "--shots", "1", "--model", "tiny"])
    again = findings.evaluate_runs(tiny_model(), char_tokenizer(), args, out, log=lambda msg: None)
    assert calls == []
    assert again["F3"]["rows"] == data["eval"]["F3"]["rows"]


def test_assembly_uses_only_chunks_complete_for_every_setting(measured, tmp_path):
    """A run stopped early: the second chunk of one F4 setting is missing, so every setting pairs on the
    first chunk only (n = 2), and nothing is generated."""
    import shutil

    out, _, _ = measured
    part = tmp_path / "part"
    shutil.copytree(out / "runs", part / "runs")
    shutil.rmtree(part / "runs" / "aqn-rmsnorm-0.005" / "chunk-001")
    args = findings.parse_args(["--out", str(part), "--n", "3", "--max-new-tokens", "3", "--batch-size", "2",
                                "--shots", "1", "--model", "tiny", "--assemble"])
    ev = findings.evaluate_runs(None, None, args, part, log=lambda msg: None, generate=False)
    assert ev["n"] == 2 and ev["n_requested"] == 3 and ev["n_clean"] == 3
    rows = {r["name"]: r for r in ev["F4"]["rows"]}
    assert rows["aqn-rmsnorm-0.005"]["n"] == 2 and rows["aqn-rmsnorm-0.005"]["comparison"]["strict"]["n"] == 2
    assert rows["aqn-linear-0.05"]["n"] == 3 and all(r["n"] == 3 for r in ev["F3"]["rows"])
    # a setting with no complete chunk is listed as not measured, not silently dropped
    shutil.rmtree(part / "runs" / "aqn-rmsnorm-0.005")
    ev = findings.evaluate_runs(None, None, args, part, log=lambda msg: None, generate=False)
    assert ev["not_measured"] == ["aqn-rmsnorm-0.005"] and len(ev["F4"]["rows"]) == 3
    assert "Not measured in this run (no complete chunk): aqn-rmsnorm-0.005" in findings.render_markdown(
        {"model": "tiny", "mode": "test", "environment": {"nproc": 2, "torch_threads": 1, "device": "cpu"},
         "wall_seconds": 1.0, "eval": ev})
    assert findings._overall([]) == "not measured"
