"""``ScanReport``: the scan's result as data (JSON is the source of truth), the problematic flags,
the recommendation, the AQN multiplier export, comparisons; tables, HTML and plots are views."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..formats.registry import get
from ..io import atomic_write_bytes, json_text, prepare_out_dir
from .plan import PlanResult
from . import views

__all__ = [
    "DEFAULT_TIERS", "LAYER_METRICS", "LayerRow", "ModuleRow", "Recommendation", "ScanReport", "Thresholds",
    "KEEP_SHARE", "MIXED_SHARE", "SCHEMA_VERSION",
]

SCHEMA_VERSION = 1
# DESIGN's decision rule on the share of problematic modules.
KEEP_SHARE = 0.10   # below: keep those modules in high precision
MIXED_SHARE = 0.30  # up to: mixed precision for the worst plus AQN; above: wider format or global AQN
# (cumulative share of decoder layers, worst first; AQN multiplier): worst 10 % x2.0, next 20 % x1.5.
DEFAULT_TIERS = ((0.10, 2.0), (0.30, 1.5))
LAYER_METRICS = ("sqnr_db", "deadzone_ratio", "saturation_ratio", "relative_error")  # METRICS until 0.3
_WORST_SHOWN = 5


@dataclass(frozen=True)
class Thresholds:
    """A module (or a decoder layer's pooled metrics) is problematic when any threshold is crossed:
    SQNR below ``sqnr_db``, or a ratio above its limit (ratios are fractions: 0.05 is 5 %)."""

    sqnr_db: float = 20.0
    deadzone_ratio: float = 0.05
    saturation_ratio: float = 0.01
    relative_error: float = 0.10

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"threshold {f.name}={value!r} must be a finite number")
        if not 0 <= self.sqnr_db <= 200:
            raise ValueError(f"threshold sqnr_db={self.sqnr_db!r} is out of range; expected dB in [0, 200] "
                             f"(default 20)")
        for name in ("deadzone_ratio", "saturation_ratio"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"threshold {name}={value!r} is out of range; expected a fraction in [0, 1] "
                                 f"(5 % is 0.05)")
        if not 0 <= self.relative_error <= 100:
            raise ValueError(f"threshold relative_error={self.relative_error!r} is out of range; expected a "
                             f"fraction in [0, 100] (10 % is 0.1)")

    @classmethod
    def coerce(cls, value) -> "Thresholds":
        """None (defaults), a Thresholds, or a mapping of some of its fields."""
        if value is None:
            return cls()
        if isinstance(value, Thresholds):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"thresholds must be a dict or Thresholds; got {type(value).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown threshold(s) {unknown}; known: {', '.join(known)}")
        return cls(**value)

    def problems(self, m: Mapping[str, float]) -> list[str]:
        """The metrics of ``m`` that cross their threshold, in LAYER_METRICS order."""
        out = []
        if m["sqnr_db"] < self.sqnr_db:
            out.append("sqnr_db")
        for name in ("deadzone_ratio", "saturation_ratio", "relative_error"):
            if m[name] > getattr(self, name):
                out.append(name)
        return out

    def describe(self, metric: str) -> str:
        limit = getattr(self, metric)
        return {
            "sqnr_db": f"SQNR below {limit:g} dB",
            "deadzone_ratio": f"deadzone above {100 * limit:g} %",
            "saturation_ratio": f"saturation above {100 * limit:g} %",
            "relative_error": f"relative error above {100 * limit:g} %",
        }[metric]


@dataclass
class ModuleRow:
    """One selected module: metrics of its quantized weight (or input) and its end-to-end effect
    alone (loss increase in nats per token, mean KL(clean || quantized) in nats; None if not run)."""

    name: str
    layer: int | None
    kind: str
    numel: int
    sqnr_db: float
    deadzone_ratio: float
    saturation_ratio: float
    relative_error: float
    loss_increase: float | None = None
    kl: float | None = None
    problems: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict, repr=False)  # raw sums, for pooling

    @property
    def problematic(self) -> bool:
        return bool(self.problems)


@dataclass
class LayerRow:
    """One decoder layer: metrics pooled over its scanned modules, and their end-to-end effects."""

    layer: int
    modules: int
    sqnr_db: float
    deadzone_ratio: float
    saturation_ratio: float
    relative_error: float
    sqnr_db_min: float
    kl_sum: float | None
    kl_max: float | None
    loss_increase_sum: float | None
    loss_increase_max: float | None
    problematic_modules: int
    problems: list[str] = field(default_factory=list)

    @property
    def problematic(self) -> bool:
        return bool(self.problems)


@dataclass(frozen=True)
class Recommendation:
    """What to do, by DESIGN's rule on the share of problematic modules, with the reasons in words."""

    action: str  # "keep_high_precision", "mixed_precision_and_aqn", "wider_format_or_global_aqn", "none",
    # or "mixed_precision_plan" (keep_high_precision: the modules the plan widens)
    share: float
    problematic: int
    total: int
    keep_high_precision: list[str]
    aqn_layers: list[int]
    wider_format: str | None
    reasons: list[str]

    @property
    def text(self) -> str:
        return " ".join(self.reasons)

    def __str__(self) -> str:
        return self.text


def _float(value):
    """JSON writes inf/nan as strings (hwnoise.io); read them back."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def _wider_format(fmt: str) -> str:
    try:
        bits = get(fmt).element.bits
    except (ValueError, TypeError):
        return "mxfp8_e4m3"
    return "mxfp6_e2m3" if bits <= 4 else "mxfp8_e4m3" if bits <= 6 else "bf16"


@dataclass
class ScanReport:
    """The result of ``hwnoise.scan``. ``to_json()`` is the source of truth; ``ScanReport.from_json``
    reads it back. ``faults`` holds a ``scan_faults`` result when one was run alongside."""

    model: str
    format: str
    mode: str
    targets: object
    thresholds: Thresholds
    texts: int
    tokens: int
    max_length: int
    clean_loss: float
    end_to_end: bool
    rows: list[ModuleRow]
    layers: list[LayerRow]
    format_options: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    note: str | None = None
    faults: object = None
    whole_model: dict | None = None  # {"loss_increase", "kl"} with every scanned module quantized at once
    plan: object = None              # a scan.plan.PlanResult when a plan search was run
    setting: str | None = None       # the Emulation spec the scan measured (weights:mxfp4, inputs:..., ...)
    dtype: str | None = None         # the model's dtype during the scan ("float32", "bfloat16")
    device: str | None = None        # the device the calibration texts ran on ("cpu", "cuda:0")

    # --- queries ---------------------------------------------------------------------------

    @property
    def problematic_rows(self) -> list[ModuleRow]:
        return [r for r in self.rows if r.problematic]

    @property
    def problematic_share(self) -> float:
        return len(self.problematic_rows) / len(self.rows) if self.rows else 0.0

    def mean(self, metric: str = "sqnr_db") -> float:
        """Mean of a row metric over the modules (finite values only)."""
        values = [getattr(r, metric) for r in self.rows if getattr(r, metric) is not None]
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan

    def _severity(self, row) -> float:
        # End-to-end KL when measured (what the model feels), else the SQNR deficit.
        if self.end_to_end and getattr(row, "kl", getattr(row, "kl_sum", None)) is not None:
            return row.kl if isinstance(row, ModuleRow) else row.kl_sum
        return -row.sqnr_db

    def worst(self, n: int | None = 10, problematic_only: bool = False) -> list[ModuleRow]:
        """Modules, worst first (largest end-to-end KL, else lowest SQNR)."""
        rows = self.problematic_rows if problematic_only else self.rows
        ranked = sorted(rows, key=self._severity, reverse=True)
        return ranked if n is None else ranked[:n]

    def worst_layers(self, n: int | None = 10) -> list[LayerRow]:
        """Decoder layers, worst first (largest summed module KL, else lowest pooled SQNR)."""
        ranked = sorted(self.layers, key=self._severity, reverse=True)
        return ranked if n is None else ranked[:n]

    # --- decisions -----------------------------------------------------------------------

    def recommendation(self) -> Recommendation:
        """DESIGN's rule: < 10 % of modules problematic: keep those in high precision; 10-30 %:
        mixed precision for the worst plus AQN; > 30 %: a wider format or global AQN."""
        bad = self.worst(None, problematic_only=True)
        total, share = len(self.rows), self.problematic_share
        t = self.thresholds
        counts = {m: sum(1 for r in bad if m in r.problems) for m in LAYER_METRICS}
        why = ", ".join(f"{n} {t.describe(m)}" for m, n in counts.items() if n)
        head = (f"{len(bad)} of {total} modules ({100 * share:.1f} %) are problematic under {self.format} "
                f"({self.mode} mode)" + (f": {why}." if why else "."))
        effect = ""
        if self.end_to_end and bad:
            w = bad[0]
            effect = (f" The largest end-to-end effect among them: {w.name} alone raises the loss by "
                      f"{w.loss_increase:+.4f} nats/token (KL {w.kl:.4f}).")
        if self.whole_model:
            w = self.whole_model
            head += (f" With every scanned module in {self.format} at once the loss rises by "
                     f"{w['loss_increase']:+.4f} nats/token (KL {w['kl']:.4f}).")
        bad_layers = sorted({r.layer for r in bad if r.layer is not None})
        plan = self.plan_result()
        if plan is not None:
            keep = [n for n, f in plan.formats.items() if f != plan.base]
            layers = sorted({r.layer for r in self.rows if r.layer is not None and plan.formats.get(r.name) == plan.base})
            return Recommendation("mixed_precision_plan", share, len(bad), total, keep, layers, None,
                                  [head + effect] + plan.recommendation())
        if not bad:
            return Recommendation("none", share, 0, total, [], [], None,
                                  [head, f"{self.format} can be used as is for the scanned modules."])
        if share < KEEP_SHARE:
            keep = [r.name for r in bad]
            return Recommendation(
                "keep_high_precision", share, len(bad), total, keep, [], None,
                [head + effect, f"Fewer than {100 * KEEP_SHARE:g} % are problematic: keep these in high "
                 f"precision (bf16) and run the rest in {self.format}: {', '.join(keep[:_WORST_SHOWN])}"
                 + (f" and {len(keep) - _WORST_SHOWN} more." if len(keep) > _WORST_SHOWN else ".")])
        if share <= MIXED_SHARE:
            n_keep = max(1, math.ceil(KEEP_SHARE * total))
            keep = [r.name for r in bad[:n_keep]]
            return Recommendation(
                "mixed_precision_and_aqn", share, len(bad), total, keep, bad_layers, None,
                [head + effect, f"Between {100 * KEEP_SHARE:g} and {100 * MIXED_SHARE:g} % are problematic: "
                 f"use mixed precision, keeping the {len(keep)} worst in bf16 "
                 f"({', '.join(keep[:_WORST_SHOWN])}{', ...' if len(keep) > _WORST_SHOWN else ''}), and "
                 f"train with AQN on the problematic decoder layers ({len(bad_layers)} layers; "
                 f"sigma_multipliers.json gives the worst ones higher noise)."])
        wider = _wider_format(self.format)
        return Recommendation(
            "wider_format_or_global_aqn", share, len(bad), total, [], sorted({r.layer for r in self.layers}),
            wider,
            [head + effect, f"More than {100 * MIXED_SHARE:g} % are problematic: too many to keep in high "
             f"precision. Choose a wider format (for example {wider}) or train with global AQN on every "
             f"decoder layer (sigma_multipliers.json weights the worst layers higher)."])

    def plan_result(self):
        """The plan search's result as a PlanResult (``plan`` may hold its JSON), or None."""
        if self.plan is None or isinstance(self.plan, PlanResult):
            return self.plan
        return PlanResult.from_json(self.plan)

    def plan_formats(self) -> dict[str, str] | None:
        """The chosen plan (module -> format spec, what plan.json holds), or None without a plan search."""
        plan = self.plan_result()
        return None if plan is None else dict(plan.formats)

    def sigma_multipliers(self, tiers: Sequence[tuple[float, float]] = DEFAULT_TIERS,
                          default: float = 1.0, targeted=None) -> dict:
        """The AQN multiplier JSON: decoder layers ranked worst first (largest summed end-to-end KL,
        else lowest pooled SQNR); tier (share, multiplier) gives the layers up to that cumulative
        share of all layers that multiplier; the rest get ``default``. ``targeted``: None (AQN on
        every layer), "problematic" (only problematic layers, or layers holding a problematic
        module), or layer indices. Loadable by ``hwnoise.aqn.LayerMultipliers`` / ``AQN(multipliers=)``."""
        checked, previous = [], 0.0
        for tier in tiers:
            try:
                share, factor = tier
            except (TypeError, ValueError):
                raise ValueError(f"each tier must be (share, multiplier); got {tier!r}") from None
            for v in (share, factor):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"tier {tier!r}: share and multiplier must be finite numbers")
            if not previous < share <= 1:
                raise ValueError(f"tier shares must increase within (0, 1]; got {share!r} after {previous!r}")
            if factor < 0:
                raise ValueError(f"tier {tier!r}: multiplier must be >= 0")
            checked.append((float(share), float(factor)))
            previous = share
        if isinstance(default, bool) or not isinstance(default, (int, float)) or not math.isfinite(default) \
                or default < 0:
            raise ValueError(f"default multiplier {default!r} must be a finite number >= 0")
        ranked = self.worst_layers(None)
        multipliers, start = {}, 0
        for share, factor in checked:
            end = min(len(ranked), math.ceil(share * len(ranked) - 1e-9))
            for layer in ranked[start:end]:
                multipliers[layer.layer] = factor
            start = max(start, end)
        if targeted is None:
            target_list = None
        elif targeted == "problematic":
            target_list = sorted({r.layer for r in self.layers if r.problematic or r.problematic_modules})
        else:
            target_list = sorted({int(i) for i in targeted})
        return {
            "layer_multipliers": {str(k): multipliers[k] for k in sorted(multipliers)},
            "default_multiplier": float(default),
            "targeted": target_list,
        }

    def compare(self, other: "ScanReport | str | os.PathLike") -> dict:
        """Before/after or format-vs-format: summaries side by side and per-module and per-layer
        deltas (other minus self) for the modules both reports hold. ``other`` is a ScanReport, or
        the path of a scan.json (or of the directory holding one)."""
        if isinstance(other, (str, os.PathLike)):
            other = ScanReport.load(other)
        if not isinstance(other, ScanReport):
            raise TypeError(f"compare takes a ScanReport, or the path of a scan.json; got {type(other).__name__} "
                            f"{other!r}")
        for what in ("dtype", "device"):
            a, b = getattr(self, what), getattr(other, what)
            if a is not None and b is not None and a != b:
                # Numbers of one model in two dtypes (or on two devices) differ for reasons of their own.
                raise ValueError(f"cannot compare scans of different {what}: {a} and {b}; scan both with the same "
                                 f"--{what} (the deltas would mix the {what} change with the format's effect)")
        def summary(r: ScanReport) -> dict:
            return {"model": r.model, "format": r.format, "mode": r.mode, "dtype": r.dtype, "device": r.device,
                    "modules": len(r.rows),
                    "sqnr_db_mean": r.mean("sqnr_db"), "deadzone_ratio_mean": r.mean("deadzone_ratio"),
                    "saturation_ratio_mean": r.mean("saturation_ratio"),
                    "relative_error_mean": r.mean("relative_error"),
                    "kl_mean": r.mean("kl") if r.end_to_end else None,
                    "problematic_share": r.problematic_share,
                    "recommendation": r.recommendation().action}

        def delta(a, b):
            return None if a is None or b is None else b - a

        mine = {r.name: r for r in self.rows}
        rows = []
        for r in other.rows:
            if r.name in mine:
                a = mine[r.name]
                rows.append({"name": r.name, "layer": r.layer,
                             **{f"{m}_delta": delta(getattr(a, m), getattr(r, m))
                                for m in LAYER_METRICS + ("loss_increase", "kl")},
                             "problematic": [a.problematic, r.problematic]})
        layers_a = {l.layer: l for l in self.layers}
        layers = [{"layer": l.layer, "sqnr_db": [layers_a[l.layer].sqnr_db, l.sqnr_db],
                   "sqnr_db_delta": l.sqnr_db - layers_a[l.layer].sqnr_db,
                   "kl_sum": [layers_a[l.layer].kl_sum, l.kl_sum],
                   "problematic": [layers_a[l.layer].problematic, l.problematic]}
                  for l in other.layers if l.layer in layers_a]
        a, b = summary(self), summary(other)
        return {"a": a, "b": b, "sqnr_db_mean_delta": b["sqnr_db_mean"] - a["sqnr_db_mean"],
                "problematic_share_delta": b["problematic_share"] - a["problematic_share"],
                "modules_in_both": len(rows), "rows": rows, "layers": layers}

    # --- data ----------------------------------------------------------------------------

    def to_json(self) -> dict:
        rec = self.recommendation()
        faults = self.faults.to_json() if hasattr(self.faults, "to_json") else self.faults
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model, "format": self.format, "format_options": dict(self.format_options),
            "mode": self.mode, "targets": self.targets, "thresholds": asdict(self.thresholds),
            "texts": self.texts, "tokens": self.tokens, "max_length": self.max_length,
            "clean_loss": self.clean_loss, "end_to_end": self.end_to_end, "note": self.note,
            "setting": self.setting, "dtype": self.dtype, "device": self.device,
            "seconds": dict(self.seconds),
            "summary": {
                "modules": len(self.rows), "decoder_layers": len(self.layers),
                "problematic_modules": len(self.problematic_rows), "problematic_share": self.problematic_share,
                "problematic_layers": [l.layer for l in self.layers if l.problematic],
                **{f"{m}_mean": self.mean(m) for m in LAYER_METRICS},
                "sqnr_db_min": min((r.sqnr_db for r in self.rows), default=math.nan),
                "sqnr_db_max": max((r.sqnr_db for r in self.rows), default=math.nan),
                "kl_mean": self.mean("kl") if self.end_to_end else None,
                "loss_increase_mean": self.mean("loss_increase") if self.end_to_end else None,
                "whole_model_loss_increase": (self.whole_model or {}).get("loss_increase"),
                "whole_model_kl": (self.whole_model or {}).get("kl"),
            },
            "whole_model": self.whole_model,
            "plan": self.plan_result().to_json() if self.plan is not None else None,
            "recommendation": asdict(rec),
            "modules": [asdict(r) for r in self.rows],
            "layers": [asdict(l) for l in self.layers],
            "faults": faults,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "ScanReport":
        """Read back ``to_json()`` output (or the parsed scan.json)."""
        def row(cls_, d):
            names = {f.name for f in fields(cls_)}
            return cls_(**{k: _float(v) for k, v in d.items() if k in names})
        return cls(
            model=data["model"], format=data["format"], mode=data["mode"], targets=data["targets"],
            thresholds=Thresholds.coerce(data["thresholds"]), texts=data["texts"], tokens=data["tokens"],
            max_length=data["max_length"], clean_loss=_float(data["clean_loss"]), end_to_end=data["end_to_end"],
            rows=[row(ModuleRow, d) for d in data["modules"]], layers=[row(LayerRow, d) for d in data["layers"]],
            format_options=dict(data.get("format_options") or {}), seconds=dict(data.get("seconds") or {}),
            note=data.get("note"), faults=data.get("faults"), whole_model=data.get("whole_model"),
            plan=data.get("plan"), setting=data.get("setting"), dtype=data.get("dtype"), device=data.get("device"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScanReport":
        """From a scan.json file, or a directory holding one. A file that is not a scan written by
        ``save()`` raises ValueError naming it and what is expected."""
        path = Path(path)
        if path.is_dir():
            path = path / "scan.json"
        if not path.exists():
            raise FileNotFoundError(f"no scan at {str(path)!r}; expected a scan.json written by hwnoise scan "
                                    f"(ScanReport.save) or the directory holding it")
        expected = "expected a scan.json written by hwnoise scan (ScanReport.save)"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{str(path)!r} is not JSON ({exc}); {expected}") from None
        required = ("model", "format", "mode", "targets", "thresholds", "texts", "tokens", "max_length",
                    "clean_loss", "end_to_end", "modules", "layers")
        missing = [k for k in required if not isinstance(data, Mapping) or k not in data]
        if missing:
            what = f"a JSON {type(data).__name__}" if not isinstance(data, Mapping) else "JSON without " + ", ".join(
                repr(k) for k in missing)
            raise ValueError(f"{str(path)!r} is not a hwnoise scan ({what}); {expected}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(f"{str(path)!r} has scan schema_version {version!r}; this hwnoise reads "
                             f"versions up to {SCHEMA_VERSION} (a newer hwnoise wrote it?)")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{str(path)!r} is not a readable hwnoise scan ({type(exc).__name__}: {exc}); "
                             f"{expected}") from None

    # --- views ---------------------------------------------------------------------------

    def to_table(self, n: int = 10, by: str = "layer"):
        """A rich Table of the ``n`` worst decoder layers (``by="layer"``) or modules (``"module"``)."""
        return views.table(self, n, by)

    def to_html(self) -> str:
        """One self-contained page: summary, recommendation, per-layer plots (embedded PNGs), worst layers."""
        return views.html_page(self)

    # The files save() may write. A save writes some of them and deletes none: a plan.json or
    # faults.json of an earlier scan may be what an eval setting or train config points at.
    OUTPUT_FILES = ("scan.json", "sigma_multipliers.json", "faults.json", "scan.html", "scan_sqnr.png",
                    "scan_deadzone.png", "scan_saturation.png", "scan_end_to_end.png", "plan.json",
                    "plan_sigma_multipliers.json", "scan_plan.png")

    def save(self, directory: str | os.PathLike, plots: bool = True, tiers=DEFAULT_TIERS) -> Path:
        """Write scan.json, sigma_multipliers.json, scan.html and the PNG plots into ``directory``.
        Only these files are written (each atomically: a temporary file renamed into place); nothing
        is deleted, so a plan.json or faults.json of an earlier scan stays (``written`` lists this
        save's files). Everything is rendered before the first write, so a
        failure while rendering leaves the previous files as they were. An existing file or a
        read-only directory as ``directory`` raises ``hwnoise.io.OutputPathError`` (a ValueError)."""
        directory = prepare_out_dir(directory, what="directory")
        files: dict[str, bytes] = {
            "scan.json": json_text(self.to_json()).encode(),
            "sigma_multipliers.json": json_text(self.sigma_multipliers(tiers)).encode(),
        }
        if self.faults is not None:
            faults = self.faults.to_json() if hasattr(self.faults, "to_json") else self.faults
            files["faults.json"] = json_text(faults).encode()
        if self.plan is not None:  # plan.json: module -> format spec, usable as weights:plan.json
            files["plan.json"] = json_text(self.plan_formats()).encode()
            files["plan_sigma_multipliers.json"] = json_text(self.plan_result().sigma_multipliers()).encode()
        images = views.render_plots(self) if plots else {}
        files["scan.html"] = views.html_page(self, images).encode()
        files.update(images)
        for name, data in files.items():
            atomic_write_bytes(directory / name, data)
        self.written = tuple(files)
        return directory


