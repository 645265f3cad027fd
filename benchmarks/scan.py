"""Time the full weight-mode scan of the bundled model: 211 linears, four metrics each, plus the
end-to-end pass of each module alone on 8 calibration texts.

Prints the total, seconds per module, and the split between the clean pass, the metrics pass
(quantize + SQNR/deadzone/saturation/relative error) and the end-to-end passes. The first scan in
a process pays for torch.compile of the quantize and metrics kernels (cached on disk by inductor
afterwards); the second scan is the steady state. The target is < 60 s on the 2-core CPU machine.

With --plan FORMATS (e.g. bf16) each repeat runs the scan twice, without and with the plan search
(issue 12: the default plan should stay within about twice the scan's time), and prints the ratio,
also the within-run split (the plan run's total over its total less the plan search).

Run: python benchmarks/scan.py [--format mxfp4] [--samples 8] [--max-length N (default 16)] [--repeats 2]
     [--plan bf16]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from rich.console import Console
from rich.table import Table

import hwnoise as hn
from hwnoise.models import load
from hwnoise.scan.calibration import DEFAULT_MAX_LENGTH

TARGET_S = 60.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="mxfp4")
    ap.add_argument("--where", default="weight", choices=("weight", "input"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    ap.add_argument("--repeats", type=int, default=2, help="scans in this process (the first compiles)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the timings here")
    ap.add_argument("--plan", default=None, help="also time the scan with this plan search (candidates, e.g. bf16)")
    args = ap.parse_args()
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=170)

    t0 = time.perf_counter()
    model, tokenizer = load("default")
    console.print(f"model loaded in {time.perf_counter() - t0:.1f} s; torch threads: {torch.get_num_threads()}")
    table = Table(title=f"hwnoise.scan of the bundled model: {args.format}, where={args.where}, "
                        f"{args.samples} texts x <= {args.max_length} tokens")
    for col in ("run", "modules", "total s", "s / module", "clean pass s", "metrics s", "metrics s / module",
                "end-to-end s", "end-to-end s / module", f"< {TARGET_S:.0f} s"):
        table.add_column(col, justify="right")
    runs = []
    for run in range(0 if args.plan else args.repeats):  # with --plan: only the with/without table
        t = time.perf_counter()
        report = hn.scan(model, tokenizer, format=args.format, where=args.where, samples=args.samples,
                         max_length=args.max_length)
        wall = time.perf_counter() - t
        n, s = len(report.rows), report.seconds
        runs.append({"run": run, "modules": n, "wall_s": wall, **s, "tokens": report.tokens})
        table.add_row("first (compiles)" if run == 0 else f"warm {run}", str(n), f"{wall:.1f}", f"{wall / n:.3f}",
                      f"{s['clean_pass']:.2f}", f"{s['metrics']:.1f}", f"{s['metrics'] / n:.4f}",
                      f"{s['end_to_end']:.1f}", f"{s['end_to_end'] / n:.3f}", "yes" if wall < TARGET_S else "NO")
    console.print(table)
    if args.plan:
        plan_table = Table(title=f"scan with and without --plan {args.plan} (same process, same texts)")
        for col in ("run", "without plan s", "with plan s", "ratio", "plan search s", "forward passes",
                    "within-run ratio", "<= 2x"):
            plan_table.add_column(col, justify="right")
        for run in range(args.repeats):
            t = time.perf_counter()
            plain = hn.scan(model, tokenizer, format=args.format, where=args.where, samples=args.samples,
                            max_length=args.max_length)
            t_plain = time.perf_counter() - t
            t = time.perf_counter()
            planned = hn.scan(model, tokenizer, format=args.format, where=args.where, samples=args.samples,
                              max_length=args.max_length, plan=args.plan)
            t_plan = time.perf_counter() - t
            s = planned.seconds
            within = s["total"] / (s["total"] - s["plan"])
            passes = planned.plan.cost["forward_passes"]["total"]
            runs.append({"run": run, "plan": args.plan, "without_plan_s": t_plain, "with_plan_s": t_plan,
                         "plan_search_s": s["plan"], "forward_passes": passes, "within_run_ratio": within,
                         "whole_model": planned.whole_model, "points": len(planned.plan.points)})
            plan_table.add_row(str(run), f"{t_plain:.1f}", f"{t_plan:.1f}", f"{t_plan / t_plain:.2f}",
                               f"{s['plan']:.1f}", str(passes), f"{within:.2f}",
                               "yes" if t_plan <= 2 * t_plain else "NO")
        console.print(plan_table)
    report = planned if args.plan else report
    summary = report.to_json()["summary"]
    console.print(f"{report.tokens} calibration tokens; SQNR {summary['sqnr_db_min']:.2f} to "
                  f"{summary['sqnr_db_max']:.2f} dB (mean {summary['sqnr_db_mean']:.2f}); "
                  f"worst module {report.worst(1)[0].name} (KL {report.worst(1)[0].kl:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
