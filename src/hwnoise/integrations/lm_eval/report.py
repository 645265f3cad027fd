"""The report of an lm-eval run: per task and setting the metric with its 95 % interval and, against
clean on the same documents, the paired statistics of ``hwnoise eval`` (``hwnoise.eval.stats``).

Per-document values come from lm-eval's samples: each sample holds ``doc_id``, ``doc_hash``, its
filter (``none``, or e.g. ``strict-match`` for GSM8K) and one value per metric. A metric is named as
lm-eval names its results, ``metric,filter`` (``acc,none``, ``exact_match,strict-match``).

- A 0/1 metric (acc, acc_norm, exact_match, ...): accuracy in points with its Wilson interval, and
  against clean ``hwnoise.eval.stats.compare``: the paired drop with its BCa bootstrap interval, the
  exact conditional interval, the exact McNemar p, the robustness class and the n that would settle
  an inconclusive one; the JSON of each comparison is ``Comparison.to_json()``, as in eval.json.
- Any other metric: its mean with a bootstrap interval, and the paired difference with its paired
  bootstrap interval, in the metric's own units (no McNemar, no class: those are for 0/1 outcomes).

The primary metric of a task (the one the table's class uses) is its first result key, lm-eval's
order: ``acc,none`` for multiple choice, ``exact_match,strict-match`` for GSM8K.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ...eval.stats import CONFIDENCE, compare, wilson_interval
from .run import REPORT_FILE, LmEvalPlan, read_samples

__all__ = ["SCHEMA_VERSION", "build_report", "per_document_values", "table"]

SCHEMA_VERSION = 1
_SAMPLE_FIELDS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                  "doc_hash", "prompt_hash", "target_hash"}


def per_document_values(samples: list[dict]) -> tuple[dict[str, dict], dict]:
    """({"metric,filter": {doc_id: value}}, {doc_id: doc_hash}) from one pair's samples.

    Example:
        >>> per_document_values([{"doc_id": 0, "doc_hash": "h", "filter": "none", "metrics": ["acc"], "acc": 1.0}])
        ({'acc,none': {'0': 1.0}}, {'0': 'h'})
    """
    values: dict[str, dict] = {}
    hashes: dict = {}
    for s in samples:
        doc = str(s["doc_id"])
        hashes[doc] = s.get("doc_hash")
        names = s.get("metrics") or [k for k in s if k not in _SAMPLE_FIELDS]
        for m in names:
            v = s.get(m)
            if isinstance(v, bool) or isinstance(v, (int, float)):
                values.setdefault(f"{m},{s.get('filter', 'none')}", {})[doc] = float(v)
    return values, hashes


def _is_binary(xs) -> bool:
    return all(x in (0.0, 1.0) for x in xs)


def _bootstrap_mean_ci(x: np.ndarray, seed: int) -> tuple[float, float]:
    from scipy import stats

    if x.size < 2 or np.all(x == x[0]):
        return float(x.mean()), float(x.mean())
    r = stats.bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=9999, method="percentile",
                        rng=np.random.default_rng(seed))
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def _metric_summary(xs: list[float], seed: int) -> dict:
    x = np.asarray(xs, dtype=float)
    if _is_binary(xs):
        k = int(x.sum())
        return {"kind": "0/1", "units": "points", "n": int(x.size), "correct": k, "value": 100.0 * k / x.size,
                "ci": list(wilson_interval(k, int(x.size))), "interval": "wilson"}
    return {"kind": "continuous", "units": "metric", "n": int(x.size), "value": float(x.mean()),
            "ci": list(_bootstrap_mean_ci(x, seed)), "interval": "bootstrap (percentile)"}


def _continuous_comparison(setting: str, metric: str, clean, other, seed: int) -> dict:
    from ...eval.stats import paired_bootstrap

    x, y = np.asarray(clean, dtype=float), np.asarray(other, dtype=float)
    low, high = paired_bootstrap(x, y, seed=seed)  # in "points": values x 100
    drop = float(x.mean() - y.mean())
    return {"setting": setting, "metric": metric, "n": int(x.size), "clean_value": float(x.mean()),
            "value": float(y.mean()), "difference": -drop, "drop": drop, "drop_ci": [low / 100.0, high / 100.0],
            "exact_drop_ci": None, "mcnemar_p": None, "b": None, "c": None,
            "robustness": "not classified", "n_needed": None,
            "reason": "a continuous metric: paired bootstrap interval of the difference in the metric's units; "
                      "McNemar and the robustness classes are for 0/1 outcomes"}


def build_report(plan: LmEvalPlan, seconds: dict | None = None) -> dict:
    """The report (JSON data) of a finished plan; written as ``<out>/lm-eval.json`` by ``save_report``."""
    from ... import __version__

    tasks_out = {}
    for task in plan.tasks:
        pairs = [p for p in plan.pairs if p.task == task]
        per_setting = {}
        for p in pairs:
            results = json.loads(p.results_path.read_text(encoding="utf-8"))
            values, hashes = per_document_values(read_samples(p.samples_path))
            per_setting[p.setting.spec] = (p, results, values, hashes)
        clean_pair, clean_results, clean_values, clean_hashes = per_setting["clean"]
        docs = sorted(clean_hashes, key=lambda d: (len(d), d))
        result_keys = [k for k in clean_results["results"] if "," in k and "_stderr" not in k]
        metrics = [k for k in result_keys if k in clean_values] + sorted(set(clean_values) - set(result_keys))
        if not metrics:
            raise ValueError(f"task {task!r}: lm-eval's samples hold no per-document metric values")
        primary = metrics[0]
        settings_out, comparisons = [], []
        for spec, (p, results, values, hashes) in per_setting.items():
            if hashes != clean_hashes:  # the paired statistics need the very same documents
                differ = sorted(set(hashes) ^ set(clean_hashes)) or [d for d in docs if hashes.get(d) != clean_hashes[d]]
                raise ValueError(f"task {task!r}: setting {spec!r} was run on other documents than clean "
                                 f"(doc ids {differ[:5]}...); rerun with --overwrite")
            summary = {m: _metric_summary([values[m][d] for d in docs], plan.options["seed"]) for m in metrics}
            settings_out.append({"spec": spec, "label": p.setting.label, "emulation": p.setting.to_dict(),
                                 "n": len(docs), "metrics": summary, "seconds": results.get("seconds"),
                                 "emulated_calls": results.get("emulated_calls"),
                                 "lm_eval_results": results["results"]})
            if spec == "clean":
                continue
            by_metric = {}
            for m in metrics:
                cx, ox = [clean_values[m][d] for d in docs], [values[m][d] for d in docs]
                if _is_binary(cx) and _is_binary(ox):
                    by_metric[m] = {**compare(spec, cx, ox, metric=m, seed=plan.options["seed"]).to_json(), "kind": "0/1"}
                else:
                    by_metric[m] = {**_continuous_comparison(spec, m, cx, ox, plan.options["seed"]), "kind": "continuous"}
            head = by_metric[primary]
            comparisons.append({"setting": spec, "label": p.setting.label, "metric": primary,
                                **{k: head[k] for k in ("kind", "difference", "drop", "drop_ci", "exact_drop_ci",
                                                        "mcnemar_p", "b", "c", "robustness", "n_needed", "reason")},
                                "by_metric": by_metric})
        tasks_out[task] = {"n": len(docs), "doc_ids": docs, "metrics": metrics, "primary_metric": primary,
                           "settings": settings_out, "comparisons": comparisons}
    return {
        "schema_version": SCHEMA_VERSION, "hwnoise_version": __version__, "model": plan.model_name,
        "tasks": tasks_out, "settings": [s.spec for s in plan.settings], **plan.options,
        "confidence": CONFIDENCE, "units": "0/1 metrics in points (percent of documents); others in their own units",
        "seconds": dict(seconds or {}),
    }


def save_report(plan: LmEvalPlan, data: dict) -> Path:
    """Write ``lm-eval.json`` (atomically) into the plan's directory; return its path."""
    from ...io import atomic_write_json

    return atomic_write_json(plan.out / REPORT_FILE, data)


def _fmt(value, kind: str) -> str:
    return f"{value:.1f}" if kind == "0/1" else f"{value:.4g}"


def table(data: dict, task: str):
    """A rich Table of one task: the primary metric per setting and the paired comparison with clean."""
    from rich.table import Table

    t_data = data["tasks"][task]
    primary = t_data["primary_metric"]
    t = Table(title=f"{task} on {data['model']} (n = {t_data['n']}, class by {primary}; 0/1 metrics in points)")
    for col in ("setting", f"{primary} [95 % CI]", "drop [95 % CI]", "McNemar p", "b / c", "class", "other metrics"):
        t.add_column(col, justify="left" if col in ("setting", "class", "other metrics") else "right", overflow="fold")
    comparisons = {c["setting"]: c for c in t_data["comparisons"]}
    for s in t_data["settings"]:
        m = s["metrics"][primary]
        cells = [s["label"], f"{_fmt(m['value'], m['kind'])} [{_fmt(m['ci'][0], m['kind'])}, {_fmt(m['ci'][1], m['kind'])}]"]
        c = comparisons.get(s["spec"])
        if c is None:
            cells += ["-", "-", "-", "(reference)"]
        else:
            cls = c["robustness"]
            if cls == "inconclusive":
                cls += f" (n ~ {c['n_needed']})" if c["n_needed"] else " (n not determinable)"
            style = {"robust": "green", "moderate": "yellow", "not robust": "red"}.get(c["robustness"], "dim")
            p = c["mcnemar_p"]
            cells += [f"{c['drop']:+.{1 if c['kind'] == '0/1' else 3}f} [{c['drop_ci'][0]:.{1 if c['kind'] == '0/1' else 3}f}, "
                      f"{c['drop_ci'][1]:.{1 if c['kind'] == '0/1' else 3}f}]",
                      "-" if p is None else (f"{p:.2g}" if p < 0.01 else f"{p:.3f}"),
                      "-" if c["b"] is None else f"{c['b']} / {c['c']}", f"[{style}]{cls}[/]"]
        others = [f"{k.split(',')[0]}{'' if k.endswith(',none') else '(' + k.split(',', 1)[1] + ')'} "
                  f"{_fmt(v['value'], v['kind'])}" for k, v in s["metrics"].items() if k != primary]
        cells.append(", ".join(others) or "-")
        t.add_row(*cells)
    return t
