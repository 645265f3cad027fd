"""Views of a ``MismatchReport``: the ranked table (rich) and the PNG (bars with 95 % intervals,
and the mismatch along the completion). They read the report's data only."""

from __future__ import annotations

__all__ = ["attribution_table", "plot_png", "table"]

_COLUMNS = (("abs_logp_diff", "mean |Δ log p|", "{:.4g}"), ("kl_k3", "KL k3 (verl)", "{:.3g}"),
            ("kl_exact", "KL exact", "{:.3g}"), ("ratio_above_clip", "ρ > C", "{:.2%}"),
            ("seq_ratio_outside_clip", "seq R ∉ [1/C, C]", "{:.1%}"))


def _cell(m: dict, fmt: str) -> str:
    return f"{fmt.format(m['mean'])} [{fmt.format(m['low'])}, {fmt.format(m['high'])}]"


def table(report):
    """The settings, ranked, with their 95 % intervals over prompts (a rich Table)."""
    from rich.table import Table

    clip = report.config["clip"]
    t = Table(title=f"rollout-training mismatch vs training={report.training} ({report.config['n']} prompts, "
                    f"{report.config['max_new_tokens']} new tokens, T={report.config['temperature']:g}, C={clip:g}; "
                    f"95 % intervals over prompts)")
    t.add_column("#", justify="right")
    t.add_column("rollout")
    for _, head, _ in _COLUMNS:
        t.add_column(head, justify="right")
    t.add_column("growth", justify="right")
    t.add_column("tokens", justify="right")
    rank_by = report.config["rank_by"]
    by_spec = {s["spec"]: s for s in report.settings}
    for r in report.ranking:
        s = by_spec[r["spec"]]
        growth = "" if s.get("growth") is None else f"{s['growth']:.2f}×"
        sep = "" if r["separated"] in (None, True) else " ≈"
        t.add_row(str(r["rank"]) + sep, s["spec"], *[_cell(s["metrics"][k], f) for k, _, f in _COLUMNS],
                  growth, str(s["tokens"]))
    t.caption = (f"ranked by {rank_by}; ≈: its interval overlaps the next setting's; growth: mean |Δ log p| in the "
                 "last position bucket over the first")
    return t


def attribution_table(attribution: dict, top: int = 10):
    from rich.table import Table

    t = Table(title=f"per-module attribution of {attribution['rollout']} on the policy's own samples "
                    f"({attribution['tokens']} completion tokens)")
    for head in ("#", "module", "KL exact", "k1 (Δ log p on sampled)", "share of sum"):
        t.add_column(head, justify="right" if head != "module" else "left")
    total = sum(max(r["kl"], 0.0) for r in attribution["modules"]) or 1.0
    for i, r in enumerate(attribution["modules"][:top], 1):
        t.add_row(str(i), r["module"], f"{r['kl']:.3g}", f"{r['k1']:.3g}", f"{max(r['kl'], 0) / total:.1%}")
    w = attribution.get("whole")
    if w:
        t.caption = f"every module at once: KL {w['kl']:.3g}, k1 {w['k1']:.3g}"
    return t


def plot_png(report) -> bytes:
    """Left: mean |Δ log p| per setting with its interval, ranked; right: along the completion."""
    from matplotlib.figure import Figure

    from ..io import figure_bytes

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    specs = [r["spec"] for r in report.ranking][::-1]
    by_spec = {s["spec"]: s for s in report.settings}
    means = [by_spec[s]["metrics"]["abs_logp_diff"]["mean"] for s in specs]
    lows = [m - by_spec[s]["metrics"]["abs_logp_diff"]["low"] for s, m in zip(specs, means)]
    highs = [by_spec[s]["metrics"]["abs_logp_diff"]["high"] - m for s, m in zip(specs, means)]
    ax.barh(range(len(specs)), means, xerr=[lows, highs], color="tab:blue", alpha=0.75, capsize=3)
    ax.set_yticks(range(len(specs)), [s if len(s) < 40 else s[:37] + "..." for s in specs])
    ax.set_xlabel("mean |Δ log p| per token (95 % interval over prompts)")
    ax.set_title(f"mismatch vs training={report.training}")
    for s in report.settings:
        rows = s["by_position"]
        if not rows:
            continue
        x = [(r["from"] + r["to"] - 1) / 2 for r in rows]
        y = [r["abs_logp_diff"]["mean"] for r in rows]
        lo = [r["abs_logp_diff"]["low"] for r in rows]
        hi = [r["abs_logp_diff"]["high"] for r in rows]
        line, = bx.plot(x, y, marker="o", label=s["spec"][:30])
        bx.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    bx.set_xscale("symlog", linthresh=8)
    bx.set_xlabel("position in the completion (token)")
    bx.set_ylabel("mean |Δ log p|")
    bx.set_title("along the completion")
    bx.legend(fontsize=7)
    return figure_bytes(fig)
