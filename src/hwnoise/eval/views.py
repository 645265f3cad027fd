"""Views of an evaluation (the data of ``EvalReport.to_json()``): a rich table, and a PNG of accuracy
against noise with 95 % Wilson interval bars (matplotlib's Figure, rendered by hwnoise.io.figure_bytes)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

from ..io import atomic_write_bytes, figure_bytes

__all__ = ["render_png", "table", "write_png"]


def _pts(value: float) -> str:
    return f"{value:.1f}"


def _ci(ci) -> str:
    return f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def table(data: dict):
    """Accuracy per setting (strict and flexible, Wilson intervals) and the paired comparison with clean."""
    from rich.table import Table

    metric = data["metric"]
    t = Table(title=f"Robustness of {data['model']} on {data.get('data') or 'the problems'} "
                    f"(n = {data['n']}, seed {data['seed']}; class by the {metric} metric, points)")
    for col in ("setting", "strict % [95 % CI]", "flexible % [95 % CI]", f"drop ({metric}) [95 % CI]", "McNemar p",
                "b / c", "class", "tokens"):
        t.add_column(col, justify="left" if col in ("setting", "class") else "right")
    comparisons = {c["setting"]: c for c in data["comparisons"]}
    for s in data["settings"]:
        cells = [s["label"], f"{_pts(s['accuracy']['strict'])} {_ci(s['wilson_ci']['strict'])}",
                 f"{_pts(s['accuracy']['flexible'])} {_ci(s['wilson_ci']['flexible'])}"]
        c = comparisons.get(s["spec"])
        if c is None:
            cells += ["-", "-", "-", "(reference)"]
        else:
            cls = c["robustness"]
            if cls == "inconclusive":
                cls += f" (n ~ {c['n_needed']})" if c["n_needed"] else " (n not determinable)"
            style = {"robust": "green", "moderate": "yellow", "not robust": "red"}.get(c["robustness"], "dim")
            cells += [f"{c['drop']:+.1f} {_ci(c['drop_ci'])}", _p(c["mcnemar_p"]), f"{c['b']} / {c['c']}",
                      f"[{style}]{cls}[/]"]
        cells.append(f"{s['mean_generated_tokens']:.0f}")
        t.add_row(*cells)
    return t


def _series(data: dict):
    """Settings grouped into noise families (same error model and place, numeric scale) and the rest."""
    families: dict[str, list[dict]] = defaultdict(list)
    others = []
    for s in data["settings"]:
        e = s.get("emulation") or {}
        if s["spec"] == "clean":
            continue
        only_error = e.get("error") and not (e.get("weight_format") or e.get("input_format") or e.get("aqn_sigma"))
        if only_error and s.get("scale") is not None:
            families[f"{e['error'].partition(':')[0]} @{e.get('where', 'ops')}"].append(s)
        elif not (e.get("error") or e.get("weight_format") or e.get("input_format")) and e.get("aqn_sigma"):
            families["AQN sigma"].append({**s, "scale": e["aqn_sigma"]})
        else:
            others.append(s)
    return families, others


def render_png(data: dict) -> bytes:
    """Accuracy (primary metric, and the other dashed) against noise scale per noise family, clean at
    scale 0 with its interval shaded; formats and mixed settings as points in a panel of their own."""
    from matplotlib.figure import Figure  # no pyplot, no backend switch: no global state is touched

    metric = data["metric"]
    other = "flexible" if metric == "strict" else "strict"
    clean = next(s for s in data["settings"] if s["spec"] == "clean")
    families, others = _series(data)
    panels = (1 if families or not others else 0) + (1 if others else 0)
    fig = Figure(figsize=(7.5 if panels == 1 else 11, 4), dpi=100)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]

    def shade(ax):
        lo, hi = clean["wilson_ci"][metric]
        ax.axhspan(lo, hi, color="grey", alpha=0.2, label=f"clean 95 % CI ({metric})")

    def bars(s, m):
        acc = s["accuracy"][m]
        lo, hi = s["wilson_ci"][m]
        return acc, [[acc - lo], [hi - acc]]

    if families or not others:
        ax = axes[0]
        shade(ax)
        for i, (name, settings) in enumerate(sorted(families.items())):
            points = sorted([clean | {"scale": 0.0}] + settings, key=lambda s: s["scale"])
            xs = [s["scale"] for s in points]
            dodge = 0.006 * (max(xs) - min(xs) or 1.0)  # the two metrics' bars side by side, not on top
            for m, style in ((metric, "-"), (other, "--")):
                shift = 0.0 if m == metric else dodge
                ys = [s["accuracy"][m] for s in points]
                lo = [s["accuracy"][m] - s["wilson_ci"][m][0] for s in points]
                hi = [s["wilson_ci"][m][1] - s["accuracy"][m] for s in points]
                ax.errorbar([x + shift for x in xs], ys, yerr=[lo, hi], fmt="o" + style, capsize=3, color=f"C{i}",
                            alpha=1.0 if m == metric else 0.5, label=f"{name} ({m})")
        if not families:
            for m, style in ((metric, "o"), (other, "s")):
                acc, err = bars(clean, m)
                ax.errorbar([0.0], [acc], yerr=err, fmt=style, capsize=3, label=f"clean ({m})")
        ax.set_xlabel("noise scale (0 = clean)")
        ax.set_ylabel("accuracy (%), 95 % Wilson interval")
        ax.set_title("Accuracy against noise")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if others:
        ax = axes[-1]
        shade(ax)
        points = [clean] + others
        for j, (m, marker) in enumerate(((metric, "o"), (other, "s"))):
            for k, s in enumerate(points):
                acc, err = bars(s, m)
                ax.errorbar([k + (j - 0.5) * 0.2], [acc], yerr=err, fmt=marker, capsize=3, color=f"C{j}",
                            alpha=1.0 if m == metric else 0.5, label=m if k == 0 else None)
        ax.set_xticks(range(len(points)), [s["label"] for s in points], rotation=20, fontsize=8)
        ax.set_ylabel("accuracy (%), 95 % Wilson interval")
        ax.set_title("Formats and other settings")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes:
        low, high = ax.get_ylim()
        ax.set_ylim(max(-2.0, low), min(102.0, high) if math.isfinite(high) else 102.0)
    fig.suptitle(f"{data['model']}: n = {data['n']}", fontsize=9)
    fig.tight_layout()

    return figure_bytes(fig)


def write_png(data: dict, path: str | os.PathLike) -> Path:
    """Render and write the PNG atomically (hwnoise.io)."""
    return atomic_write_bytes(path, render_png(data))
