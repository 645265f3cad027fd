"""Time the full weight-mode scan of the bundled model: 211 linears, four metrics each, plus the
end-to-end pass of each module alone on 8 calibration texts.

Prints the total, seconds per module, and the split between the clean pass, the metrics pass
(quantize + SQNR/deadzone/saturation/relative error) and the end-to-end passes. The first scan in
a process pays for torch.compile of the quantize and metrics kernels (cached on disk by inductor
afterwards); the second scan is the steady state. The target is < 60 s on the 2-core CPU machine.

With --plan FORMATS (e.g. bf16) each repeat runs the scan twice, without and with the plan search
(issue 12: the default plan should stay within about twice the scan's time), and prints the ratio,
also the within-run split (the plan run's total over its total less the plan search).

With --against SRC (the ``src`` folder of another checkout, e.g. a ``git worktree`` of an earlier
commit) the scan of this checkout and of that one run in alternating fresh processes (against,
this, against, this, ... ``--rounds`` times), so machine load hits both alike; each process times its
warm scans, and the parent prints the wall-time ratio (this / against, median over rounds) and
whether every field of the two scan.json (``to_json()`` minus ``seconds`` and the keys only one
side has) is equal.

Run: python benchmarks/scan.py [--format mxfp4] [--samples 8] [--max-length N (default 16)] [--repeats 2]
     [--plan bf16] [--against /tmp/before/src --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    ap.add_argument("--against", default=None, help="the src folder of another checkout: time and compare both")
    ap.add_argument("--rounds", type=int, default=3, help="with --against: alternating process pairs")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one timed process
    args = ap.parse_args()
    if args.against:
        return against(args)
    if args.worker:
        return worker(args)
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


def worker(args) -> None:
    """One process of --against: load, scan ``repeats`` times, write the timings and the last scan."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load("default")
    walls = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        report = hn.scan(model, tokenizer, format=args.format, where=args.where, samples=args.samples,
                         max_length=args.max_length)
        walls.append(time.perf_counter() - t)
    Path(args.worker).write_text(json.dumps({"walls": walls, "hwnoise": hn.__file__, "scan": report.to_json()}))


def _comparable(data: dict, keys) -> dict:
    return {k: v for k, v in data.items() if k in keys and k != "seconds"}


def against(args) -> None:
    """Alternate processes of this checkout and of ``args.against``; print the ratio and the equality."""
    here = str(Path(__file__).resolve().parents[1] / "src")
    sides = {"against": str(Path(args.against).resolve()), "this": here}
    results: dict[str, list[dict]] = {"against": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, src in sides.items():
                out = Path(tmp) / f"{side}{r}.json"
                cmd = [sys.executable, __file__, "--worker", str(out), "--format", args.format, "--where", args.where,
                       "--samples", str(args.samples), "--max-length", str(args.max_length),
                       "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
                env = dict(os.environ, PYTHONPATH=src)
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                data = json.loads(out.read_text())
                assert data["hwnoise"].startswith(src), (data["hwnoise"], src)  # the intended checkout ran
                results[side].append(data)
                print(f"round {r} {side:8s} warm scan {min(data['walls'][1:] or data['walls']):.2f} s "
                      f"(all: {', '.join(f'{w:.2f}' for w in data['walls'])})", flush=True)
    warm = {side: [min(d["walls"][1:] or d["walls"]) for d in runs] for side, runs in results.items()}
    ratios = [t / a for t, a in zip(warm["this"], warm["against"])]
    a, b = results["against"][-1]["scan"], results["this"][-1]["scan"]
    keys = set(a) & set(b)
    equal = _comparable(a, keys) == _comparable(b, keys)
    diff = sorted(k for k in keys if k != "seconds" and a[k] != b[k])
    summary = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "warm_s": warm, "ratios": ratios,
               "ratio_median": statistics.median(ratios), "scan_json_equal": equal, "fields_differing": diff,
               "fields_compared": sorted(keys - {"seconds"}), "only_this": sorted(set(b) - set(a)),
               "only_against": sorted(set(a) - set(b))}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
