"""`hwnoise report`: the runs table from run directories built in the test (no training needed)."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from hwnoise.cli import app
from hwnoise.eval.report import EvalReport, SettingResult
from hwnoise.rl.runs import load_run, runs_markdown, summarize_runs

IDS = [f"p{i}" for i in range(20)]


def _wilson(k, n, z=1.959963984540054):
    """Wilson score interval in points, from the closed form."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def _report(correct: list[bool]) -> dict:
    setting = SettingResult(spec="clean", label="clean", emulation={}, scale=None,
                            correct={"strict": list(correct), "flexible": list(correct)},
                            generated_tokens=[8] * len(correct))
    return EvalReport(model="m", data="arith", problems=IDS, seed=0, batch_size=4, max_new_tokens=8,
                      metric="strict", settings=[setting]).to_json()


def _make_run(root, name, config, evals: dict[int, list[bool]], *, records=True, finished=True, extra_lines=()):
    run = root / name
    run.mkdir()
    (run / "hwnoise_config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps({"step": s, "report": _report(c)}) for s, c in evals.items()] + list(extra_lines)
    (run / "evals.jsonl").write_text("\n".join(lines) + "\n")
    if records:
        for step, correct in evals.items():
            d = run / "evals" / f"step-{step:06d}"
            d.mkdir(parents=True)
            (d / "records.jsonl").write_text("".join(
                json.dumps({"setting": "clean", "problem_id": pid, "correct_strict": ok, "correct_flexible": ok}) + "\n"
                for pid, ok in zip(IDS, correct)))
    if finished:
        (run / "run.json").write_text(json.dumps({"config": config, "status": "finished", "steps": max(evals)}))
    return run


BASE = {"algorithm": {"loss_type": "grpo"}, "finetune": "full", "emulation": {}, "aqn": {"enabled": False}}
NOISY = {"algorithm": {"loss_type": "dapo"}, "finetune": "lora", "lora": {"rank": 8},
         "emulation": {"rollout": "weights:mxfp4", "training": None},
         "aqn": {"enabled": True, "schedule": "staged", "sigma_start": 0.01, "sigma_end": 0.0005}}

# Baseline: right on the first 10. The AQN run at its final step: b = 1 (p0 lost), c = 7 (p10..p16 gained).
BASE_FINAL = [i < 10 for i in range(20)]
AQN_FINAL = [1 <= i < 17 for i in range(20)]


@pytest.fixture
def runs(tmp_path):
    aqn = _make_run(tmp_path, "mxfp4-aqn", NOISY, {3: [i < 18 for i in range(20)], 6: AQN_FINAL})
    base = _make_run(tmp_path, "baseline", BASE, {3: [i < 4 for i in range(20)], 6: BASE_FINAL})
    return aqn, base


def test_final_best_intervals_and_paired_delta(runs):
    aqn, base = runs
    summary = summarize_runs([aqn, base], metric="strict")
    assert summary["baseline"] == "baseline"  # picked: the run without emulation or AQN
    row = {r["run"]: r for r in summary["runs"]}
    a = row["mxfp4-aqn"]
    assert (a["final"]["step"], a["final"]["accuracy"]) == (6, 80.0)
    assert (a["best"]["step"], a["best"]["accuracy"]) == (3, 90.0)  # the best eval is not the last
    assert a["final"]["ci"] == pytest.approx(_wilson(16, 20), abs=1e-9)
    assert a["emulation"] == "weights:mxfp4 (rollout)" and a["aqn"] == "staged 0.01->0.0005"
    assert a["finetune"] == "lora r8" and a["algorithm"] == "dapo"
    d = a["delta"]
    assert d["paired"] and d["points"] == pytest.approx(30.0)
    assert d["mcnemar_p"] == pytest.approx(2 * (1 + 8) / 2**8)  # b=1, c=7: 2 * P(X <= 1), X ~ Bin(8, 1/2)
    assert d["ci"][0] < 30.0 < d["ci"][1]
    assert row["baseline"]["baseline"] and row["baseline"]["delta"] is None


def test_a_resumed_step_keeps_its_last_evaluation_and_a_cut_last_line_is_ignored(tmp_path):
    again = json.dumps({"step": 6, "report": _report([True] * 20)})
    run = _make_run(tmp_path, "r", BASE, {6: BASE_FINAL}, records=False, extra_lines=[again, '{"step": 9, "rep'])
    evals = load_run(run)["evals"]
    assert [e["step"] for e in evals] == [6]
    assert evals[0]["report"]["settings"][0]["accuracy"]["strict"] == 100.0


def test_delta_is_unpaired_without_records_and_a_running_run_is_reported(tmp_path):
    base = _make_run(tmp_path, "base", BASE, {4: BASE_FINAL})
    other = _make_run(tmp_path, "noisy", NOISY, {4: AQN_FINAL}, records=False, finished=False)
    summary = summarize_runs([base, other], metric="flexible")
    row = summary["runs"][1]
    assert row["status"] == "running or killed"
    assert row["delta"]["ci"] is None and "records missing" in row["delta"]["reason"]
    assert row["delta"]["points"] == pytest.approx(30.0)
    assert "records missing" in runs_markdown(summary)


def test_explicit_baseline_and_bad_input(runs, tmp_path):
    aqn, base = runs
    assert summarize_runs([aqn, base], baseline="mxfp4-aqn")["baseline"] == "mxfp4-aqn"
    with pytest.raises(ValueError, match="baseline 'nope' is not one of the runs: mxfp4-aqn, baseline"):
        summarize_runs([aqn, base], baseline="nope")
    with pytest.raises(ValueError, match="unknown metric 'exact'; known: strict, flexible"):
        summarize_runs([aqn], metric="exact")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a hwnoise train run directory"):
        summarize_runs([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no run directory"):
        summarize_runs([tmp_path / "missing"])


def test_cli_writes_markdown_and_json(runs, tmp_path):
    aqn, base = runs
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", str(base), str(aqn), "--metric", "strict", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "runs.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["baseline", "mxfp4-aqn"]
    md = (out / "runs.md").read_text()
    assert "| mxfp4-aqn |" in md and "+30.0 [" in md and "baseline" in md
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no run directory" in bad.output


def test_run_directories_are_described_by_their_per_phase_specs():
    from hwnoise.rl.runs import describe_config

    new = {"emulation": {"rollout": "weights:mxfp4+relative:0.05@ops", "training": "weights:mxfp4"}}
    assert describe_config(new)["emulation"] == "weights:mxfp4+relative:0.05@ops (rollout), weights:mxfp4 (training)"
    assert describe_config({"emulation": {"rollout": "clean", "training": None}})["emulation"] == "-"


