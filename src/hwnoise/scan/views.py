"""Views of a ScanReport: a rich table of the worst layers, per-layer PNG plots (a matplotlib
Figure rendered by hwnoise.io.figure_bytes; the backend is never touched), and one self-contained
HTML page (plots embedded as base64)."""

from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path

from ..io import atomic_write_bytes, figure_bytes

__all__ = ["PLOTS", "html_page", "plan_table", "render_plots", "short_name", "table", "write_plots"]

# file name -> (title, y label); one plot per metric over decoder-layer index.
PLOTS = {
    "scan_sqnr.png": ("SQNR per decoder layer", "SQNR (dB)"),
    "scan_deadzone.png": ("Deadzone per decoder layer", "deadzone (% of nonzero values)"),
    "scan_saturation.png": ("Saturation per decoder layer", "saturation (% of values)"),
    "scan_end_to_end.png": ("End-to-end effect per decoder layer", "KL / loss increase (nats)"),
}


def _fmt(value, spec: str = ".2f", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value * scale, spec)


_LAYER_PREFIX = re.compile(r"^(?:\w+\.)*?(?:layers|layer|h|blocks|block)\.(\d+)\.(.+)$")


def short_name(name: str) -> str:
    """A module name short enough for an 80-column table: ``model.layers.2.mlp.down_proj`` ->
    ``L2.mlp.down_proj`` (decoder layer 2); a name outside the decoder layers loses its ``model.``
    prefix. Full names stay in scan.json and the HTML page."""
    m = _LAYER_PREFIX.match(name)
    if m:
        return f"L{m.group(1)}.{m.group(2)}"
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    return name


def table(report, n: int = 10, by: str = "layer"):
    """A rich Table of the n worst decoder layers or modules."""
    from rich.table import Table

    if by not in ("layer", "module"):
        raise ValueError(f"by must be 'layer' or 'module'; got {by!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} rows is not accepted; give an integer >= 1")
    e2e = report.end_to_end
    if by == "layer":
        t = Table(title=f"Worst decoder layers under {report.format} ({report.mode} mode)")
        cols = ["layer", "modules", "SQNR dB", "worst SQNR dB", "deadzone %", "saturation %", "rel. error %"]
        cols += ["KL sum", "loss +max"] if e2e else []
        cols += ["problematic"]
        for c in cols:
            t.add_column(c, justify="right")
        for l in report.worst_layers(n):
            cells = [str(l.layer), str(l.modules), _fmt(l.sqnr_db), _fmt(l.sqnr_db_min),
                     _fmt(l.deadzone_ratio, ".2f", 100), _fmt(l.saturation_ratio, ".3f", 100),
                     _fmt(l.relative_error, ".1f", 100)]
            cells += [_fmt(l.kl_sum, ".4f"), _fmt(l.loss_increase_max, "+.4f")] if e2e else []
            cells += [f"{l.problematic_modules}/{l.modules}" + (" *" if l.problematic else "")]
            t.add_row(*cells)
        return t
    worst = report.worst(n)
    names = [short_name(r.name) for r in worst]
    t = Table(title=f"Worst modules under {report.format} ({report.mode} mode)",
              caption="L<n>: decoder layer n" if any(a != b for a, b in zip(names, (r.name for r in worst))) else None)
    cols = ["module", "SQNR dB", "deadzone %", "saturation %", "rel. error %"]
    cols += ["KL", "loss +"] if e2e else []
    cols += ["problems"]
    for c in cols:
        if c == "module":  # never shortened by rich: the names are the point of the table
            t.add_column(c, justify="left", no_wrap=True, min_width=max(map(len, names), default=6))
        else:
            t.add_column(c, justify="left" if c == "problems" else "right")
    for r, name in zip(worst, names):
        cells = [name, _fmt(r.sqnr_db), _fmt(r.deadzone_ratio, ".2f", 100), _fmt(r.saturation_ratio, ".3f", 100),
                 _fmt(r.relative_error, ".1f", 100)]
        cells += [_fmt(r.kl, ".4f"), _fmt(r.loss_increase, "+.4f")] if e2e else []
        cells += [", ".join(r.problems) or "-"]
        t.add_row(*cells)
    return t


def render_plots(report) -> dict[str, bytes]:
    """PNG bytes per file name in PLOTS (the end-to-end plot only when end-to-end was measured)."""
    from matplotlib.figure import Figure  # no pyplot, no backend switch: no global state is touched


    layers = report.layers
    xs = [l.layer for l in layers]
    th = report.thresholds
    series = {
        "scan_sqnr.png": ([("pooled", [l.sqnr_db for l in layers]), ("worst module", [l.sqnr_db_min for l in layers])],
                          th.sqnr_db),
        "scan_deadzone.png": ([("pooled", [100 * l.deadzone_ratio for l in layers])], 100 * th.deadzone_ratio),
        "scan_saturation.png": ([("pooled", [100 * l.saturation_ratio for l in layers])], 100 * th.saturation_ratio),
    }
    if report.end_to_end:
        series["scan_end_to_end.png"] = ([("KL, summed over modules", [l.kl_sum for l in layers]),
                                          ("largest loss increase", [l.loss_increase_max for l in layers])], None)
    out = {}
    for name, (lines, limit) in series.items():
        title, ylabel = PLOTS[name]
        fig = Figure(figsize=(7.5, 3.2), dpi=100)
        ax = fig.add_subplot()
        for label, ys in lines:
            ys = [math.nan if y is None or not math.isfinite(y) else y for y in ys]
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{title} ({report.format}, {report.mode})")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out[name] = figure_bytes(fig)
    plan = report.plan_result() if hasattr(report, "plan_result") else None
    if plan is not None:
        out["scan_plan.png"] = figure_bytes(_plan_figure(plan, Figure))
    return out


def _plan_figure(plan, Figure):
    """Effective bits per weight vs measured KL and loss increase, every point of the plan search;
    the Pareto front joined, the chosen plan ringed, the target drawn."""
    pts = sorted(plan.points, key=lambda p: p["effective_bits"])
    front = [p for p in pts if p.get("pareto")]
    fig = Figure(figsize=(7.5, 3.6), dpi=100)
    for i, (key, label) in enumerate((("kl", "KL (nats)"), ("loss_increase", "loss increase (nats/token)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter([p["effective_bits"] for p in pts], [p[key] for p in pts], s=12, color="grey", label="measured")
        ax.plot([p["effective_bits"] for p in front], [p[key] for p in front], marker="o", markersize=3,
                label="Pareto front (by KL)")
        chosen = plan.chosen_point
        if chosen is not None:
            ax.scatter([chosen["effective_bits"]], [chosen[key]], s=80, facecolors="none", edgecolors="red",
                       label="plan")
        t = plan.target
        if (t["kind"], key) in (("kl", "kl"), ("loss", "loss_increase")):
            ax.axhline(t["value"], color="red", linestyle="--", linewidth=1, label="target")
        elif t["kind"] == "bits":
            ax.axvline(t["value"], color="red", linestyle="--", linewidth=1, label="budget")
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Mixed-precision plan: {', '.join(plan.candidates)} (each point measured)", fontsize=10)
    fig.tight_layout()
    return fig


def plan_table(plan):
    """A rich Table of the plan search's measured points (the Pareto table), the chosen one marked."""
    from rich.table import Table

    t = Table(title=f"Mixed-precision plan: {', '.join(plan.candidates)}; every point measured with the whole plan "
                    f"in place", caption=f"*: the plan ({plan.target['kind']} target {plan.target['value']:.4g})")
    for c in ("upgrades", "eff. bits", "loss +", "KL", "Pareto", "last upgrade"):
        t.add_column(c, justify="left" if c == "last upgrade" else "right")
    for i, p in enumerate(plan.points):
        t.add_row(str(p["changes"]) + (" *" if i == plan.chosen else ""), f"{p['effective_bits']:.3f}",
                  f"{p['loss_increase']:+.4f}", f"{p['kl']:.4f}", "yes" if p.get("pareto") else "",
                  short_name(p["last"].split(" -> ")[0]) + " -> " + p["last"].split(" -> ")[1] if p.get("last")
                  else f"all {plan.base}")
    return t


def _plan_html(plan, png, e) -> str:
    out = [f"<h2>Mixed-precision plan ({e(', '.join(plan.candidates))})</h2>"]
    if png:
        out.append(f"<p><img alt='scan_plan.png' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in ("upgrades", "effective bits", "loss increase", "KL",
                                                       "Pareto", "last upgrade")) + "</tr>"
    rows = "".join(
        f"<tr class='{'bad' if i == plan.chosen else ''}'><td>{p['changes']}</td><td>{p['effective_bits']:.3f}</td>"
        f"<td>{p['loss_increase']:+.4f}</td><td>{p['kl']:.4f}</td><td>{'yes' if p.get('pareto') else ''}</td>"
        f"<td>{e(p.get('last', 'all ' + plan.base))}</td></tr>" for i, p in enumerate(plan.points))
    out.append(f"<table>{head}{rows}</table><p><small>Highlighted: the chosen plan. Cost: "
               f"{e(str(plan.cost.get('forward_passes')))}.</small></p>")
    return "\n".join(out)


def write_plots(report, directory: str | os.PathLike) -> dict[str, bytes]:
    """Write the PNG plots into ``directory``, each atomically; returns their bytes (for the HTML page)."""
    images = render_plots(report)
    for name, data in images.items():
        atomic_write_bytes(Path(directory) / name, data)
    return images


def html_page(report, images: dict[str, bytes] | None = None) -> str:
    """One self-contained HTML page: summary, recommendation, plots, worst layers and modules."""
    images = render_plots(report) if images is None else images
    e = html.escape
    data = report.to_json()
    s = data["summary"]
    rec = report.recommendation()
    summary = [
        ("model", report.model), ("format", report.format + (f" {report.format_options}" if report.format_options else "")),
        ("mode", report.mode), ("modules scanned", s["modules"]), ("decoder layers", s["decoder_layers"]),
        ("calibration", f"{report.texts} texts, {report.tokens} tokens (at most {report.max_length} per text)"),
        ("clean loss", f"{report.clean_loss:.4f} nats/token"),
        ("SQNR (dB): mean / min / max", f"{_fmt(s['sqnr_db_mean'])} / {_fmt(s['sqnr_db_min'])} / {_fmt(s['sqnr_db_max'])}"),
        ("problematic modules", f"{s['problematic_modules']} ({100 * s['problematic_share']:.1f} %)"),
        ("thresholds", f"SQNR < {report.thresholds.sqnr_db:g} dB, deadzone > {100 * report.thresholds.deadzone_ratio:g} %, "
                       f"saturation > {100 * report.thresholds.saturation_ratio:g} %, relative error > "
                       f"{100 * report.thresholds.relative_error:g} %"),
        ("time", ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())),
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>hwnoise scan: {e(str(report.model))} under {e(report.format)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.bad{background:#fde2e2}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>Layer-sensitivity scan: {e(str(report.model))} under {e(report.format)}</h1>",
        "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in summary) + "</table>",
    ]
    if report.note:
        parts.append(f"<p><em>{e(report.note)}</em></p>")
    parts.append("<h2>Recommendation</h2>" + "".join(f"<p>{e(r)}</p>" for r in rec.reasons))
    plan = report.plan_result() if hasattr(report, "plan_result") else None
    if plan is not None:
        parts.append(_plan_html(plan, images.get("scan_plan.png"), e))
    parts.append("<h2>Per-layer plots</h2>")
    for name, png in images.items():
        if name == "scan_plan.png":
            continue
        parts.append(f"<p><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")

    def rows_html(headers, rows):
        head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>"
        body = "".join(f"<tr class='{'bad' if bad else ''}'>" + "".join(f"<td>{e(str(c))}</td>" for c in cells)
                       + "</tr>" for cells, bad in rows)
        return f"<table>{head}{body}</table>"

    e2e = report.end_to_end
    parts.append("<h2>Worst decoder layers</h2>")
    headers = ["layer", "SQNR dB", "worst SQNR dB", "deadzone %", "saturation %", "rel. error %"]
    headers += ["KL sum", "largest loss increase"] if e2e else []
    headers += ["problematic modules"]
    parts.append(rows_html(headers, [
        ([l.layer, _fmt(l.sqnr_db), _fmt(l.sqnr_db_min), _fmt(l.deadzone_ratio, ".2f", 100),
          _fmt(l.saturation_ratio, ".3f", 100), _fmt(l.relative_error, ".1f", 100)]
         + ([_fmt(l.kl_sum, ".4f"), _fmt(l.loss_increase_max, "+.4f")] if e2e else [])
         + [f"{l.problematic_modules}/{l.modules}"], l.problematic) for l in report.worst_layers(15)]))
    parts.append("<h2>Worst modules</h2>")
    headers = ["module", "SQNR dB", "deadzone %", "saturation %", "rel. error %"]
    headers += ["KL", "loss increase"] if e2e else []
    headers += ["problems"]
    parts.append(rows_html(headers, [
        ([r.name, _fmt(r.sqnr_db), _fmt(r.deadzone_ratio, ".2f", 100), _fmt(r.saturation_ratio, ".3f", 100),
          _fmt(r.relative_error, ".1f", 100)] + ([_fmt(r.kl, ".4f"), _fmt(r.loss_increase, "+.4f")] if e2e else [])
         + [", ".join(r.problems) or "-"], r.problematic) for r in report.worst(20)]))
    if report.faults is not None:
        faults = report.faults.to_json() if hasattr(report.faults, "to_json") else report.faults
        parts.append(f"<h2>Fault scan: {e(str(faults.get('config_a')))} vs {e(str(faults.get('config_b')))}</h2>")
        parts.append(rows_html(
            ["layer", "gain a", "gain b", "gain ratio", "kurtosis a", "kurtosis b", "kurtosis ratio",
             "instability a", "instability b", "flagged"],
            [([f["layer"], _fmt(f["gain_a"], ".3f"), _fmt(f["gain_b"], ".3f"), _fmt(f["gain_ratio"], ".3f"),
               _fmt(f["kurtosis_a"], ".2f"), _fmt(f["kurtosis_b"], ".2f"), _fmt(f["kurtosis_ratio"], ".3f"),
               _fmt(f["instability_a"], ".2e"), _fmt(f["instability_b"], ".2e"), ", ".join(f["flags"]) or "-"],
              bool(f["flags"])) for f in faults.get("layers", [])]))
    parts.append("<p><small>scan.json is the source of truth; this page is a view of it.</small></p></body></html>")
    return "\n".join(parts)
