"""One table of training runs (`hwnoise report RUN_DIR...`): configuration, final and best held-out
accuracy with 95 % Wilson intervals, and the difference from a baseline run.

A run directory is what ``hwnoise train`` writes: ``hwnoise_config.yaml`` (the resolved config),
``evals.jsonl`` (one ``{"step", "report"}`` line per periodic evaluation, ``report`` being an
``EvalReport.to_json()``), ``run.json`` once training ends, and per evaluation the per-problem
records under ``evals/step-NNNNNN/records.jsonl``. A run still in progress or one that crashed is
reported from what it wrote so far, with its status.

The difference from the baseline compares final evaluations. When both runs scored the same
held-out problems and kept their per-problem records, it is paired: the bootstrap interval and
exact McNemar p-value of ``hwnoise.eval.stats.compare``. Otherwise the difference is given
without an interval and the row says why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["RUNS_SCHEMA_VERSION", "load_run", "summarize_runs", "runs_markdown", "write_runs_report"]

RUNS_SCHEMA_VERSION = 1
_METRICS = ("strict", "flexible")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def load_run(run_dir: str | os.PathLike) -> dict:
    """Config, status, steps and evaluations of one run directory."""
    import yaml

    from .callbacks import read_evals

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"no run directory {str(run_dir)!r}")
    run_file, config_file = run_dir / "run.json", run_dir / "hwnoise_config.yaml"
    if run_file.is_file():
        run = _read_json(run_file)
        config, status, steps = run.get("config", {}), run.get("status", "unknown"), run.get("steps")
    elif config_file.is_file():
        config, status, steps = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}, "running or killed", None
    else:
        raise ValueError(f"{str(run_dir)!r} is not a hwnoise train run directory: it has neither run.json nor "
                         "hwnoise_config.yaml")
    return {"name": run_dir.name, "path": str(run_dir), "config": config, "status": status, "steps": steps,
            "evals": read_evals(run_dir)}


def describe_config(config: dict) -> dict[str, str]:
    """Short columns naming what distinguishes runs: algorithm, fine-tuning, emulation, AQN."""
    algo = config.get("algorithm", {}) or {}
    finetune = config.get("finetune", "full")
    if finetune == "lora":
        lora = config.get("lora", {}) or {}
        finetune = f"lora r{lora.get('rank')}"
    emu = config.get("emulation", {}) or {}
    parts = []
    for phase in ("rollout", "training"):  # the emulation spec of each phase (TrainConfig's form)
        spec = emu.get(phase)
        if spec and spec != "clean":
            parts.append(f"{spec} ({phase})")
    aqn = config.get("aqn", {}) or {}
    if aqn.get("enabled"):
        kind = aqn.get("schedule", "staged")
        sigma = (f"{aqn.get('sigma_start'):g}" if kind == "constant"
                 else f"{aqn.get('sigma_start'):g}->{aqn.get('sigma_end'):g}")
        aqn_text = f"{kind} {sigma}" + (" + multipliers" if aqn.get("multipliers") else "")
    else:
        aqn_text = "-"
    return {"algorithm": str(algo.get("loss_type", "grpo")), "finetune": str(finetune),
            "emulation": ", ".join(parts) or "-", "aqn": aqn_text}


def _clean_setting(report: dict) -> dict | None:
    return next((s for s in report.get("settings", []) if s.get("spec") == "clean"), None)


def _point(step: int, report: dict, metric: str) -> dict | None:
    clean = _clean_setting(report)
    if clean is None:
        return None
    return {"step": step, "n": clean["n"], "accuracy": clean["accuracy"][metric],
            "ci": list(clean["wilson_ci"][metric]), "correct": clean["correct"][metric]}


def _records(run: dict, step: int, metric: str) -> dict[str, bool] | None:
    """Per-problem correctness of the clean setting at ``step``, if the run kept its records."""
    from ..eval.core import RECORDS_FILE, read_records
    from .callbacks import eval_dir

    path = eval_dir(run["path"], step) / RECORDS_FILE
    if not path.is_file():
        return None

    return {pid: bool(r[f"correct_{metric}"]) for (setting, pid), r in read_records(path).items() if setting == "clean"}


def _is_baseline_config(config: dict) -> bool:
    emu = config.get("emulation", {}) or {}
    specs = [emu.get(phase) for phase in ("rollout", "training")]
    return not (any(spec and spec != "clean" for spec in specs) or (config.get("aqn", {}) or {}).get("enabled"))


def _pick_baseline(runs: list[dict], baseline) -> int:
    if baseline is not None:
        names = [r["name"] for r in runs]
        paths = [str(Path(r["path"]).resolve()) for r in runs]
        key = str(baseline)
        if key in names:
            return names.index(key)
        if str(Path(key).resolve()) in paths:
            return paths.index(str(Path(key).resolve()))
        raise ValueError(f"baseline {key!r} is not one of the runs: {', '.join(names)}")
    plain = [i for i, r in enumerate(runs) if _is_baseline_config(r["config"])]
    return plain[0] if plain else 0


def summarize_runs(run_dirs, baseline=None, metric: str = "flexible", seed: int = 0) -> dict:
    """The runs table as JSON: one row per run, with the difference from the baseline run.

    baseline: a run's directory name or path; default the first run without emulation or AQN
    (else the first run). metric: "strict" or "flexible" accuracy.
    """
    from ..eval.stats import compare

    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(_METRICS)}")
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    base_index = _pick_baseline(runs, baseline)
    rows = []
    for run in runs:
        points = [p for p in (_point(e["step"], e["report"], metric) for e in run["evals"]) if p is not None]
        final = points[-1] if points else None
        best = max(points, key=lambda p: (p["accuracy"], -p["step"])) if points else None
        rows.append({"run": run["name"], "path": run["path"], "status": run["status"], "steps": run["steps"],
                     **describe_config(run["config"]), "final": final, "best": best, "evals": len(points)})
    base_row, base_run = rows[base_index], runs[base_index]
    for row, run in zip(rows, runs):
        row["baseline"] = row is base_row
        row["delta"] = None
        if row is base_row or row["final"] is None or base_row["final"] is None:
            continue
        delta = {"points": row["final"]["accuracy"] - base_row["final"]["accuracy"], "ci": None,
                 "mcnemar_p": None, "paired": False, "reason": ""}
        mine = _records(run, row["final"]["step"], metric)
        theirs = _records(base_run, base_row["final"]["step"], metric)
        if mine is None or theirs is None:
            delta["reason"] = "unpaired: per-problem records missing"
        elif set(mine) != set(theirs):
            delta["reason"] = "unpaired: the runs scored different problems"
        else:
            ids = sorted(theirs)
            c = compare(row["run"], [theirs[i] for i in ids], [mine[i] for i in ids], metric=metric, seed=seed)
            low, high = c.drop_ci
            delta.update(points=-c.drop, ci=[-high, -low], mcnemar_p=c.mcnemar_p, paired=True,
                         reason=f"paired on {c.n} problems")
        row["delta"] = delta
    return {"schema_version": RUNS_SCHEMA_VERSION, "metric": metric, "baseline": base_row["run"],
            "units": "points (percent of held-out problems)", "runs": rows}


def _acc(point: dict | None) -> str:
    if point is None:
        return "-"
    low, high = point["ci"]
    return f"{point['accuracy']:.1f} [{low:.1f}, {high:.1f}] @{point['step']}"


def _delta(row: dict) -> str:
    if row["baseline"]:
        return "baseline"
    d = row["delta"]
    if d is None:
        return "-"
    text = f"{d['points']:+.1f}"
    if d["ci"] is not None:
        text += f" [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] p={d['mcnemar_p']:.3g}"
    else:
        text += f" ({d['reason']})"
    return text


COLUMNS = ("run", "status", "algorithm", "finetune", "emulation", "aqn", "final acc. [95% CI] @step",
           "best acc. [95% CI] @step", "delta vs baseline (pts)")


def _cells(row: dict) -> list[str]:
    return [row["run"], str(row["status"]), row["algorithm"], row["finetune"], row["emulation"], row["aqn"],
            _acc(row["final"]), _acc(row["best"]), _delta(row)]


def runs_markdown(summary: dict) -> str:
    """The runs table as Markdown."""
    lines = [f"# Runs ({summary['metric']} accuracy, points; baseline: {summary['baseline']})", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in summary["runs"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    lines += ["", "Intervals: 95 % Wilson for accuracies; paired bootstrap (BCa) for the difference, with the "
              "exact McNemar p-value, when both runs scored the same problems."]
    return "\n".join(lines) + "\n"


def runs_table(summary: dict):
    """The runs table as a rich Table."""
    from rich.table import Table

    table = Table(title=f"Runs: {summary['metric']} accuracy (points), baseline {summary['baseline']}")
    for col in COLUMNS:
        table.add_column(col)
    for row in summary["runs"]:
        table.add_row(*_cells(row))
    return table


def write_runs_report(summary: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``runs.json`` and ``runs.md`` into ``out`` atomically; return both paths."""
    from ..io import atomic_write_json, atomic_write_text, prepare_out_dir

    out = prepare_out_dir(out)
    return (atomic_write_json(out / "runs.json", summary), atomic_write_text(out / "runs.md", runs_markdown(summary)))
