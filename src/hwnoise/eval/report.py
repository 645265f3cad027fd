"""``EvalReport``: an evaluation's result as data. ``to_json()`` is the source of truth; the table
and the PNG (``hwnoise.eval.views``) are views of it; ``save(out)`` writes eval.json and eval.png."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_write_json, prepare_out_dir
from .stats import CONFIDENCE, Comparison, compare, wilson_interval
from . import views

__all__ = ["ANSWER_METRICS", "SCHEMA_VERSION", "EvalReport", "SettingResult"]

SCHEMA_VERSION = 1
ANSWER_METRICS = ("strict", "flexible")  # hwnoise.rewards' extraction modes (METRICS until 0.3)


@dataclass
class SettingResult:
    """One setting on all problems: per-problem correctness (problem order) and generated tokens."""

    spec: str
    label: str
    emulation: dict
    scale: float | None
    correct: dict[str, list[bool]]
    generated_tokens: list[int]

    @classmethod
    def from_records(cls, spec: str, label: str, emulation: dict, scale, records: list[dict]) -> SettingResult:
        return cls(spec=spec, label=label, emulation=emulation, scale=scale,
                   correct={m: [bool(r[f"correct_{m}"]) for r in records] for m in ANSWER_METRICS},
                   generated_tokens=[int(r["generated_tokens"]) for r in records])

    @property
    def n(self) -> int:
        return len(self.generated_tokens)

    def accuracy(self, metric: str) -> float:
        """Accuracy in points (percent of problems)."""
        return 100.0 * sum(self.correct[metric]) / self.n

    def to_json(self) -> dict:
        return {
            "spec": self.spec, "label": self.label, "emulation": self.emulation, "scale": self.scale, "n": self.n,
            "correct": {m: int(sum(self.correct[m])) for m in ANSWER_METRICS},
            "accuracy": {m: self.accuracy(m) for m in ANSWER_METRICS},
            "wilson_ci": {m: list(wilson_interval(int(sum(self.correct[m])), self.n)) for m in ANSWER_METRICS},
            "mean_generated_tokens": float(np.mean(self.generated_tokens)),
        }


@dataclass
class EvalReport:
    """Accuracy per setting with 95 % Wilson intervals, and each setting against clean: the paired
    drop with its bootstrap interval, the exact McNemar p-value and the robustness class (points)."""

    model: str
    data: str | None
    problems: list[str]
    seed: int
    batch_size: int
    max_new_tokens: int
    metric: str
    settings: list[SettingResult]
    seconds: dict[str, float] = field(default_factory=dict)  # generation time per setting in this call
    note: str | None = None

    @property
    def clean(self) -> SettingResult:
        return next(s for s in self.settings if s.spec == "clean")

    def comparisons(self, metric: str | None = None) -> list[Comparison]:
        """Each non-clean setting against clean on ``metric`` (default: the report's primary metric)."""
        metric = metric or self.metric
        clean = self.clean
        return [compare(s.spec, clean.correct[metric], s.correct[metric], metric=metric, seed=self.seed)
                for s in self.settings if s.spec != "clean"]

    def to_json(self) -> dict:
        from .. import __version__  # the top-level package defines it (a module-level import would be circular)

        by_metric = {m: {c.setting: c.to_json() for c in self.comparisons(m)} for m in ANSWER_METRICS}
        comparisons = []
        for s in self.settings:
            if s.spec == "clean":
                continue
            primary = by_metric[self.metric][s.spec]
            comparisons.append({
                "setting": s.spec, "label": s.label, "metric": self.metric,
                **{k: primary[k] for k in ("difference", "drop", "drop_ci", "exact_drop_ci", "mcnemar_p", "b", "c", "robustness",
                                           "n_needed", "reason")},
                "by_metric": {m: by_metric[m][s.spec] for m in ANSWER_METRICS},
            })
        return {
            "schema_version": SCHEMA_VERSION, "hwnoise_version": __version__,
            "model": self.model, "data": self.data, "n": len(self.problems), "seed": self.seed,
            "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens, "metric": self.metric,
            "confidence": CONFIDENCE, "units": "points (percent of problems)",
            "settings": [s.to_json() for s in self.settings],
            "comparisons": comparisons,
            "note": self.note, "seconds": dict(self.seconds),
        }

    # --- views ---------------------------------------------------------------------------

    def to_table(self):
        """A rich Table: accuracy per setting with intervals, and the comparison with clean."""
        return views.table(self.to_json())

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``eval.json`` (atomically) and ``eval.png`` into ``out``; return the directory."""
        out = prepare_out_dir(out)
        data = self.to_json()
        atomic_write_json(out / "eval.json", data)
        views.write_png(data, out / "eval.png")
        return out

    @staticmethod
    def load_json(path: str | os.PathLike) -> dict:
        """The data of an eval.json file (or of a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "eval.json"
        return json.loads(path.read_text(encoding="utf-8"))


