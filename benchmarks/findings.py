"""What hwnoise reproduces of the research's findings: measure F1-F4 (and prepare F5), JSON first.

One command regenerates every table and figure of docs/findings.md:

    python benchmarks/findings.py --out DIR [--quick] [--model PATH]   # F1-F4 -> DIR/findings.json, .md, .png
    python benchmarks/findings.py --out DIR --render-only              # rebuild the Markdown/PNGs from the JSON
    python benchmarks/findings.py --out DIR --train [--quick|--device cuda]  # F5: pilot, baseline / noise / MXFP4 (+ AQN)

What each finding measures (public API only: hn.scan, hn.evaluate, hn.AQN, hn.Emulation specs,
hwnoise.data.load_problems, hwnoise.models.load, hwnoise.rl):

- F1: ``hn.scan(where="weight")`` under NVFP4 and MXFP4; per module SQNR, MSE, mean relative error and
  deadzone; NVFP4 - MXFP4 paired over modules with a bootstrap interval (resampling modules).
- F2: ``hn.scan`` under MXFP4 with ``where="input"`` (W16A4) and ``where="weight"`` (W4A16); per module
  relative error, paired over modules.
- F3: ``hn.evaluate`` clean and under ``relative:1e-4@ops``, ``relative:1e-3@ops``, ``relative:5e-2@ops``
  (operator noise on every matmul; evaluation is forward only): Wilson intervals, exact McNemar,
  paired bootstrap of the drop, hwnoise.eval's robustness class and n_needed.
- F4: ``hn.AQN(Constant(sigma), targets="linear")`` vs ``targets="rmsnorm"`` at sigma 0.05 and
  0.005 (one draw, seed 0, held over the whole evaluation) around ``hn.evaluate``; accuracy paired
  with F3's clean run on the same problems, and the mean next-token entropy (nats) of the model on
  its own clean completions (teacher-forced) under each condition.
- F5 (``--train``): ``hwnoise.rl.train`` (LoRA, GRPO/DAPO, zero-shot prompts, strict ``#### N`` reward +
  format bonus) in stages, each writing its own result and skipped when done: the start model evaluated
  clean and under each condition; a pilot stage (short baseline runs, one per ``--pilot-lrs``) that picks
  the learning rate; then baseline, ``noise`` (5 % relative operator noise in rollout and training,
  forward and backward), ``mxfp4`` (MXFP4 W4A16 rollouts), each condition also + epoch-aware AQN on the
  RMSNorm weights; every run's end evaluated clean and under every condition, paired (McNemar,
  bootstrap, n_needed). ``--quick``: 4 steps, 4 problems, 8 tokens (the end-to-end test);
  ``--device cuda``: the GPU sizing; ``--train-budget-min``: a time budget (rerun to continue).

Evaluation runs are resumable (``DIR/runs/*``: hn.evaluate's records.jsonl), so a killed run
continues where it stopped. ``findings.json`` is written atomically; the Markdown (``findings.md``)
and PNGs are views of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
JSON_FILE = "findings.json"
MD_FILE = "findings.md"
TRAIN_JSON_FILE = "train.json"

# Problem set and token budget chosen by the pilot (docs/findings.md, "Choice of problems").
DEFAULT_PROBLEMS = "arith:level=1"
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 20
# Worked examples (from the problem set's train stream, never its test stream) put before each question:
# the bundled 135M model rarely ends with '#### N' zero-shot (0/8 strict on level 1 in the pilot).
DEFAULT_SHOTS = 2
MODES = {
    # n problems per evaluated setting; calibration texts for the scans
    "quick": {"n": 16, "scan_samples": 8},
    "full": {"n": 100, "scan_samples": 16},
}
# Run in this order (the clear-degradation claim first: it settles at the smallest n).
F3_DEGRADES = "relative:5e-2@ops"
F3_SETTINGS = (F3_DEGRADES, "relative:1e-3@ops", "relative:1e-4@ops")
F4_SIGMAS = (0.05, 0.005)
F4_LAYER_TYPES = ("linear", "rmsnorm")
F1_FORMATS = ("nvfp4", "mxfp4")
F1_METRICS = ("sqnr_db", "mse", "relative_error", "deadzone_ratio")
F2_FORMAT = "mxfp4"
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 9999
# F3: "unchanged within run-to-run variation" is supported when the drop is not significant and its
# whole 95 % interval stays within this many points (the boundary of hwnoise.eval's "moderate" class).
UNCHANGED_MARGIN = 3.0
# F4: "collapse" = accuracy at most this share of clean accuracy, significantly below it.
COLLAPSE_SHARE = 0.25

CLAIMS = {
    "F1": "NVFP4 beats MXFP4 by SQNR (18.83 vs 18.59 dB) and MSE, yet shows the higher mean relative error "
          "(26.5 % vs 21.8 %) because of its larger deadzone (13.2 % vs 9.4 %): relative error misleads.",
    "F2": "Quantizing activations (W16A4) costs far more than quantizing weights (W4A16): about 36 % vs 20 % "
          "relative error per layer.",
    "F3": "Operator-level relative noise on every matmul of 1e-4 and 1e-3 (forward and backward) leaves accuracy "
          "unchanged within run-to-run variation; 5e-2 degrades it clearly.",
    "F4": "AQN-style noise on linear weights collapses the model (sigma 0.05 and even 0.005: entropy up, accuracy "
          "to ~0), while the same sigma on RMSNorm weights is tolerated.",
    "F5": "Under 5 % matmul noise, epoch-aware AQN recovers part of the loss in accuracy (68.2 -> 70.6 %), "
          "global-decay AQN less (68.8 %).",
}
SOURCE = "Qwen2.5-1.5B, GSM8K, verl, 8 GPUs"


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (findings.json, findings.md, PNGs, runs/)")
    ap.add_argument("--quick", action="store_true", help=f"small n ({MODES['quick']['n']} problems per setting): "
                    "a smoke run of the whole pipeline in under 15 minutes on 2 CPU cores")
    ap.add_argument("--train", action="store_true", help="F5: pilot, then baseline / 5 %% noise / MXFP4 rollouts, each + AQN")
    ap.add_argument("--render-only", action="store_true", help="rebuild findings.md and the PNGs from DIR's JSON")
    ap.add_argument("--model", default="default", help="model: 'default' (bundled SmolLM2-135M) or a path/HF id")
    ap.add_argument("--problems", default=DEFAULT_PROBLEMS, help=f"problem set (default {DEFAULT_PROBLEMS!r})")
    ap.add_argument("--n", type=int, default=None, help="problems per evaluated setting (default: by mode)")
    ap.add_argument("--shots", type=int, default=DEFAULT_SHOTS, help="worked examples (train split) before each "
                    f"question (default {DEFAULT_SHOTS}; 0: the bare question)")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (F1-F4 evaluation and F5 training)")
    ap.add_argument("--only", default=None, help="comma-separated subset of F1,F2,F3,F4 (default: all)")
    ap.add_argument("--f4-sigmas", default=",".join(f"{x:g}" for x in F4_SIGMAS),
                    help="F4: which sigmas to run (a subset of the default: lets processes share F4)")
    ap.add_argument("--assemble", action="store_true", help="F3/F4: generate nothing; assemble findings.json from "
                    "the chunks every setting has completed (n may then be below --n)")
    ap.add_argument("--train-steps", type=int, default=None, help="F5: optimizer steps per run (default: by mode)")
    ap.add_argument("--train-lr", type=float, default=None, help="F5: learning rate of the runs (skips the pilot "
                    f"stage; default: the pilot's choice, else {TRAIN_LR:g})")
    ap.add_argument("--pilot-lrs", default=None, help="F5: the pilot stage's learning rates (comma-separated; "
                    "default: by mode)")
    ap.add_argument("--train-runs", default=",".join(TRAIN_RUNS), help="F5: which runs, in order (a subset of "
                    f"{','.join(TRAIN_RUNS)}; finished runs in DIR are reused, not retrained)")
    ap.add_argument("--train-n-eval", type=int, default=None, help="F5: held-out problems (default: by mode)")
    ap.add_argument("--train-tokens", type=int, default=None, help="F5: completion and evaluation tokens (default: by mode)")
    ap.add_argument("--train-budget-min", type=float, default=None, help="F5: stop after this many minutes (a "
                    "training run stops at its next step with a checkpoint); rerun the command to continue")
    ap.add_argument("--train-engine", default="hf", help="F5: rollout engine 'hf' or 'vllm' (TRL colocate; run "
                    "with .venv-verl; the noise runs are refused: vLLM's kernels do not call operator noise)")
    ap.add_argument("--train-finetune", default="lora", help="F5: 'lora' (default) or 'full'")
    args = ap.parse_args(argv)
    errors = []
    for name in ("n", "max_new_tokens", "batch_size", "threads", "train_steps", "train_n_eval", "train_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.train_lr is not None and not args.train_lr > 0:
        errors.append(f"--train-lr must be > 0; got {args.train_lr:g}")
    if args.train_budget_min is not None and not args.train_budget_min > 0:
        errors.append(f"--train-budget-min must be > 0; got {args.train_budget_min:g}")
    if args.pilot_lrs is not None:
        try:
            lrs = tuple(float(t) for t in args.pilot_lrs.split(",") if t.strip())
        except ValueError:
            lrs = ()
        if not lrs or any(not x > 0 for x in lrs):
            errors.append(f"--pilot-lrs: expected comma-separated learning rates > 0; got {args.pilot_lrs!r}")
        args.pilot_lrs = lrs
    runs = [r.strip() for r in args.train_runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in TRAIN_RUNS]
    if unknown or not runs:
        errors.append(f"--train-runs: expected a subset of {','.join(TRAIN_RUNS)}; got {args.train_runs!r}")
    args.train_runs = tuple(runs)
    if args.train_engine not in ("hf", "vllm"):
        errors.append(f"--train-engine must be 'hf' or 'vllm'; got {args.train_engine!r}")
    elif args.train_engine == "vllm":
        noisy = [r for r in runs if RUN_CONDITION.get(r) == "noise"]
        if noisy:
            errors.append(f"--train-engine vllm: the runs {','.join(noisy)} train under operator noise, which vLLM's "
                          "kernels do not call; use --train-runs baseline,mxfp4,mxfp4+aqn (or --train-engine hf)")
    if args.train_finetune not in ("lora", "full"):
        errors.append(f"--train-finetune must be 'lora' or 'full'; got {args.train_finetune!r}")
    if args.shots < 0:
        errors.append(f"--shots must be >= 0; got {args.shots}")
    if args.only is not None:
        wanted = [s.strip().upper() for s in args.only.split(",") if s.strip()]
        bad = [s for s in wanted if s not in ("F1", "F2", "F3", "F4")]
        if bad or not wanted:
            errors.append(f"--only: unknown finding(s) {bad or args.only!r}; known: F1, F2, F3, F4")
        args.only = tuple(wanted)
    else:
        args.only = ("F1", "F2", "F3", "F4")
    try:
        sigmas = tuple(float(t) for t in args.f4_sigmas.split(",") if t.strip())
    except ValueError:
        sigmas = ()
    if not sigmas or any(x not in F4_SIGMAS for x in sigmas):
        errors.append(f"--f4-sigmas: expected a subset of {','.join(f'{x:g}' for x in F4_SIGMAS)}; got {args.f4_sigmas!r}")
    args.f4_sigmas = tuple(x for x in F4_SIGMAS if x in sigmas)
    if args.device not in ("cpu", "cuda"):
        errors.append(f"--device must be 'cpu' or 'cuda'; got {args.device!r}")
    if errors:
        ap.error("; ".join(errors))
    mode = "quick" if args.quick else "full"
    args.mode = mode
    if args.n is None:
        args.n = MODES[mode]["n"]
    return args


# --------------------------------------------------------------------------------------------------
# Statistics over modules (F1, F2)
# --------------------------------------------------------------------------------------------------


def paired_mean_interval(a, b, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean of a - b over paired items with a percentile bootstrap interval (resampling items) and
    the exact sign-flip-free Wilcoxon signed-rank p-value (scipy)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two 1-D paired samples of the same length >= 2; got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(BOOTSTRAP_RESAMPLES, d.size))
    means = d[idx].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return {"n": int(d.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": float(d.mean()),
            "ci": [float(low), float(high)], "wilcoxon_p": p, "share_a_greater": float(np.mean(d > 0))}


def direction(interval: dict, expected_sign: int) -> str:
    """'as claimed' / 'opposite' / 'unclear' for a paired mean difference and the sign the claim expects."""
    low, high = interval["ci"]
    if expected_sign > 0:
        return "as claimed" if low > 0 else "opposite" if high < 0 else "unclear"
    return "as claimed" if high < 0 else "opposite" if low > 0 else "unclear"


def module_rows(report) -> list[dict]:
    """Per module of a ScanReport: name and the four metrics (MSE from the scan's raw sums)."""
    rows = []
    for r in report.rows:
        numel = r.stats.get("numel") or r.numel
        rows.append({"name": r.name, "layer": r.layer, "sqnr_db": r.sqnr_db, "mse": r.stats["noise"] / numel,
                     "relative_error": r.relative_error, "deadzone_ratio": r.deadzone_ratio})
    return rows


def pooled(report) -> dict:
    """Whole-model figures pooled over modules (SQNR of the summed signal and noise, share-weighted ratios)."""
    s = {k: sum(r.stats[k] for r in report.rows) for k in ("signal", "noise", "relative_error_sum", "nonzero",
                                                            "deadzone", "numel")}
    return {"sqnr_db": 10 * math.log10(s["signal"] / s["noise"]) if s["noise"] else math.inf,
            "mse": s["noise"] / s["numel"], "relative_error": s["relative_error_sum"] / s["nonzero"],
            "deadzone_ratio": s["deadzone"] / s["nonzero"]}


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def measure_f1(model, tokenizer, samples: int) -> dict:
    import hwnoise as hn

    scans, t0 = {}, time.perf_counter()
    for fmt in F1_FORMATS:
        scans[fmt] = hn.scan(model, tokenizer, format=fmt, where="weight", end_to_end=False, samples=samples)
    rows = {fmt: module_rows(r) for fmt, r in scans.items()}
    names = [r["name"] for r in rows["nvfp4"]]
    if names != [r["name"] for r in rows["mxfp4"]]:
        raise RuntimeError("the two scans covered different modules")
    expected = {"sqnr_db": +1, "mse": -1, "relative_error": +1, "deadzone_ratio": +1}
    paired = {}
    for metric in F1_METRICS:
        iv = paired_mean_interval([r[metric] for r in rows["nvfp4"]], [r[metric] for r in rows["mxfp4"]])
        iv["expected_sign"] = expected[metric]
        iv["direction"] = direction(iv, expected[metric])
        paired[metric] = iv
    dirs = [paired[m]["direction"] for m in F1_METRICS]
    if all(d == "as claimed" for d in dirs):
        verdict = "reproduced in direction"
    elif any(d == "opposite" for d in dirs):
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return {"formats": list(F1_FORMATS), "mode": "weight", "modules": len(names),
            "pooled": {fmt: pooled(r) for fmt, r in scans.items()}, "paired": paired, "rows": rows,
            "verdict": verdict, "seconds": time.perf_counter() - t0}


def measure_f2(model, tokenizer, samples: int) -> dict:
    import hwnoise as hn

    t0 = time.perf_counter()
    scans = {mode: hn.scan(model, tokenizer, format=F2_FORMAT, where=mode, end_to_end=False, samples=samples)
             for mode in ("input", "weight")}
    rows = {mode: module_rows(r) for mode, r in scans.items()}
    by_name = {mode: {r["name"]: r for r in rows[mode]} for mode in rows}
    names = [n for n in by_name["weight"] if n in by_name["input"]]
    iv = paired_mean_interval([by_name["input"][n]["relative_error"] for n in names],
                              [by_name["weight"][n]["relative_error"] for n in names])
    iv["expected_sign"] = +1
    iv["direction"] = direction(iv, +1)
    sq = paired_mean_interval([by_name["input"][n]["sqnr_db"] for n in names],
                              [by_name["weight"][n]["sqnr_db"] for n in names])
    verdict = {"as claimed": "reproduced in direction", "opposite": "not reproduced"}.get(iv["direction"], "inconclusive")
    return {"format": F2_FORMAT, "modules": len(names), "pooled": {m: pooled(r) for m, r in scans.items()},
            "paired_relative_error": iv, "paired_sqnr_db": sq, "rows": rows, "verdict": verdict,
            "seconds": time.perf_counter() - t0}


def _strip_calculator(answer: str) -> str:
    """GSM8K-style solutions carry calculator annotations (``<<10*5=50>>``); a prompt shows them without."""
    import re

    return re.sub(r"<<[^>]*>>", "", answer)


def build_problems(spec: str, n: int, shots: int) -> list[dict]:
    """``n`` test problems of ``spec``; with ``shots``, each question is prefixed by that many worked
    examples from the train split (the same examples for every question)."""
    from hwnoise.data import load_problems

    problems = load_problems(spec, n=n)
    prefix = ""
    if shots:
        examples = load_problems(spec, n=shots, split="train")
        prefix = "".join(f"Question: {e.question}\nAnswer: {_strip_calculator(e.answer)}\n\n" for e in examples)
        prefix_q = "Question: "
    else:
        prefix_q = ""
    return [{"id": p.id, "question": prefix + prefix_q + p.question, "gold": p.gold} for p in problems]


def completion_entropy(model, tokenizer, records: list[dict], device) -> list[float]:
    """Per problem, the mean entropy (nats) of the next-token distribution over the positions of its
    clean completion, teacher-forced (one forward per problem, no padding)."""
    import torch

    out = []
    with torch.no_grad():
        for r in records:
            prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
            if not completion:
                out.append(float("nan"))
                continue
            ids = torch.tensor([prompt + completion], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            out.append(float(-(logp.exp() * logp).sum(-1).mean()))
    return out


def _comparison_json(c) -> dict:
    return c.to_json() if hasattr(c, "to_json") else dict(c.__dict__)


def _verdict_unchanged(c: dict) -> str:
    low, high = c["drop_ci"]
    exact = c.get("exact_drop_ci") or c["drop_ci"]
    low, high = min(low, exact[0]), max(high, exact[1])
    if c["mcnemar_p"] < ALPHA:
        return "not reproduced"
    if -UNCHANGED_MARGIN <= low and high <= UNCHANGED_MARGIN:
        return "reproduced in direction"
    return "inconclusive"


def _verdict_degrades(c: dict) -> str:
    if c["mcnemar_p"] < ALPHA and c["drop"] > 0:
        return "reproduced in direction"
    if c["mcnemar_p"] < ALPHA and c["drop"] < 0:
        return "not reproduced"
    return "inconclusive"


def _verdict_collapse(c: dict) -> str:
    if c["mcnemar_p"] < ALPHA and c["drop"] > 0 and c["accuracy"] <= COLLAPSE_SHARE * c["clean_accuracy"]:
        return "reproduced in direction"
    if c["mcnemar_p"] < ALPHA and c["drop"] > 0:
        return "partly (degrades, no collapse)"
    return "not reproduced" if c["mcnemar_p"] >= ALPHA and c.get("n_needed") is None else "inconclusive"


ENTROPY_PROBLEMS = 20


def _entropy_cached(model, tokenizer, path: Path, records: list[dict]) -> list[float]:
    if path.is_file():
        return json.loads(path.read_text())
    values = completion_entropy(model, tokenizer, records, model.device)
    write_json(path, values)
    return values


def _chunk_records(run_dir: Path, chunk: list[dict], specs: list[str]) -> dict | None:
    """{spec: [record per problem of the chunk]} when the chunk's run is complete, else None."""
    from hwnoise.eval.core import read_records

    records = read_records(run_dir / "records.jsonl") if (run_dir / "records.jsonl").is_file() else {}
    if not all((spec, p["id"]) in records for spec in specs for p in chunk):
        return None
    return {spec: [records[(spec, p["id"])] for p in chunk] for spec in specs}


def unpaired_mean_interval(a, b, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean of a minus mean of b (independent samples), percentile bootstrap interval, Welch p (scipy)."""
    from scipy import stats

    a = np.asarray([v for v in a if math.isfinite(v)], dtype=float)
    b = np.asarray([v for v in b if math.isfinite(v)], dtype=float)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"need at least 2 finite values on each side; got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    diffs = (a[rng.integers(0, a.size, (BOOTSTRAP_RESAMPLES, a.size))].mean(1)
             - b[rng.integers(0, b.size, (BOOTSTRAP_RESAMPLES, b.size))].mean(1))
    low, high = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"n_a": int(a.size), "n_b": int(b.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "mean_diff": float(a.mean() - b.mean()), "ci": [float(low), float(high)],
            "welch_p": float(stats.ttest_ind(a, b, equal_var=False).pvalue)}


def _chunks(problems: list[dict], size: int) -> list[list[dict]]:
    return [problems[i:i + size] for i in range(0, len(problems), size)]


def _setting_summary(spec: str, label: str, records: list[dict]) -> dict:
    from hwnoise.eval.stats import wilson_interval

    n = len(records)
    out = {"spec": spec, "label": label, "n": n, "correct": {}, "accuracy": {}, "wilson_ci": {},
           "mean_generated_tokens": float(np.mean([r["generated_tokens"] for r in records]))}
    for m in ("strict", "flexible"):
        k = int(sum(r[f"correct_{m}"] for r in records))
        out["correct"][m], out["accuracy"][m] = k, 100.0 * k / n
        out["wilson_ci"][m] = list(wilson_interval(k, n))
    return out


def _compare(name: str, clean: list[dict], other: list[dict]) -> dict:
    from hwnoise.eval.stats import compare

    return {m: _comparison_json(compare(name, [r[f"correct_{m}"] for r in clean], [r[f"correct_{m}"] for r in other],
                                        metric=m, seed=0)) for m in ("strict", "flexible")}


def _entropy_interval(entropy, clean_entropy) -> dict | None:
    """The entropy difference, or None when a side has under 2 problems with completion tokens
    (a model that answers with EOS at once has no completion to measure)."""
    finite = [[v for v in side if math.isfinite(v)] for side in (entropy or [], clean_entropy or [])]
    if min(len(f) for f in finite) < 2:
        return None
    return unpaired_mean_interval(*finite)


def evaluate_runs(model, tokenizer, args, out: Path, log, which=("F3", "F4"), generate: bool = True) -> dict | None:
    """F3 and F4 on the same problems, in chunks of ``batch_size`` problems (one ``hn.evaluate`` run per
    chunk under out/runs/NAME/chunk-KKK: resumable, and every setting reaches the same n chunk by chunk,
    so a run stopped early still pairs every setting on the same problems).

    F4's runs pair with F3's clean records, so the result is assembled only when both are in ``which``
    and all F4 sigmas are selected; a call for a part only fills its run directories (several
    processes can fill them side by side). ``generate=False`` assembles from the complete chunks
    already recorded, generating nothing (n is then the number of problems every setting has).
    """
    import hwnoise as hn
    from hwnoise.aqn.schedules import Constant

    problems = build_problems(args.problems, args.n, args.shots)
    chunks = _chunks(problems, args.batch_size)
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=0,
                  model_name=str(args.model), data_name=args.problems)
    runs = out / "runs"
    t0 = time.perf_counter()
    f4_names = [(f"aqn-{t}-{s:g}", t, s) for s in args.f4_sigmas for t in F4_LAYER_TYPES]
    f3_specs = ["clean", *F3_SETTINGS]
    if generate:
        for c, chunk in enumerate(chunks):
            if "F3" in which:
                log(f"F3: chunk {c + 1}/{len(chunks)}: clean + {', '.join(F3_SETTINGS)} ({time.perf_counter() - t0:.0f} s)")
                hn.evaluate(model, tokenizer, chunk, list(F3_SETTINGS), out=runs / "f3" / f"chunk-{c:03d}", **common)
            if "F4" in which:
                for name, layer_types, sigma in f4_names:
                    run_dir = runs / name / f"chunk-{c:03d}"
                    if _chunk_records(run_dir, chunk, ["clean"]) is not None:
                        continue
                    log(f"F4: chunk {c + 1}/{len(chunks)}: {name} ({time.perf_counter() - t0:.0f} s)")
                    aqn = hn.AQN(Constant(sigma), targets=layer_types, seed=0)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # the linear-sigma warning is the point here
                        with aqn.noisy(model, step=0, total_steps=1):
                            hn.evaluate(model, tokenizer, chunk, ["clean"], out=run_dir, **common)
                            if c == 0:  # entropy of the noisy model on its own completions, first chunk
                                recs = _chunk_records(run_dir, chunk, ["clean"])["clean"][:ENTROPY_PROBLEMS]
                                _entropy_cached(model, tokenizer, runs / name / "entropy.json", recs)
                            std = [s_.effective_std for s_ in aqn.stats().values()]
                    write_json(runs / name / "noise.json", {"parameters_noised": len(std),
                                                            "mean_effective_std": float(np.mean(std)) if std else 0.0})
            if "F3" in which and c == 0:
                recs = _chunk_records(runs / "f3" / f"chunk-{c:03d}", chunk, ["clean"])["clean"][:ENTROPY_PROBLEMS]
                _entropy_cached(model, tokenizer, runs / "f3" / "entropy_clean.json", recs)
    if not ("F3" in which and "F4" in which and tuple(args.f4_sigmas) == F4_SIGMAS):
        return None

    # Assemble: each setting pairs with clean on the leading chunks both have completed (all of them
    # when the run finished; fewer when it was stopped early: each row states its n).
    def collect(run_root: Path, spec: str) -> list[dict]:
        recs = []
        for c, chunk in enumerate(chunks):
            got = _chunk_records(run_root / f"chunk-{c:03d}", chunk, [spec])
            if got is None:
                break
            recs += got[spec]
        return recs

    def entropy_of(path: Path):
        return json.loads(path.read_text()) if path.is_file() else None

    clean = collect(runs / "f3", "clean")
    if not clean:
        raise RuntimeError(f"no chunk of {args.batch_size} problems has its clean records under {runs / 'f3'}")
    clean_entropy = entropy_of(runs / "f3" / "entropy_clean.json")
    labels = {spec: hn.Emulation.parse(spec).label for spec in f3_specs}
    f3_settings = [_setting_summary("clean", "clean", clean)]
    f3_rows, missing = [], []
    for spec in F3_SETTINGS:
        recs = collect(runs / "f3", spec)
        if not recs:
            missing.append(spec)
            continue
        f3_settings.append(_setting_summary(spec, labels[spec], recs))
        comps = _compare(spec, clean[:len(recs)], recs)
        claim_kind = "degrades" if spec == F3_DEGRADES else "unchanged"
        primary = comps["strict"]
        verdict = _verdict_degrades(primary) if claim_kind == "degrades" else _verdict_unchanged(primary)
        f3_rows.append({"setting": spec, "claim": claim_kind, "verdict": verdict, **primary, "flexible": comps["flexible"]})
    f4 = []
    for name, layer_types, sigma in f4_names:
        recs = collect(runs / name, "clean")
        if not recs:
            missing.append(name)
            continue
        summary = _setting_summary(name, name, recs)
        comps = _compare(name, clean[:len(recs)], recs)
        primary = comps["strict"]
        verdict = _verdict_collapse(primary) if layer_types == "linear" else _verdict_unchanged(primary)
        noise = entropy_of(runs / name / "noise.json") or {}
        entropy = entropy_of(runs / name / "entropy.json")
        f4.append({"name": name, "layer_types": layer_types, "sigma": sigma,
                   "noise_draw": "one draw (seed 0) held over the whole evaluation", **noise, "n": summary["n"],
                   "accuracy": summary["accuracy"]["strict"], "accuracy_flexible": summary["accuracy"]["flexible"],
                   "wilson_ci": summary["wilson_ci"]["strict"], "mean_generated_tokens": summary["mean_generated_tokens"],
                   "comparison": comps, "verdict": verdict, "sample_completion": recs[0]["completion"][:160],
                   "entropy": _entropy_interval(entropy, clean_entropy),
                   "empty_completions": sum(not r["completion"].strip() for r in recs)})
    done = min([len(clean)] + [r["n"] for r in f3_rows] + [r["n"] for r in f4])
    return {
        "problems": args.problems, "n": done, "n_requested": args.n, "n_clean": len(clean), "not_measured": missing, "shots": args.shots,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "entropy_problems": ENTROPY_PROBLEMS,
        "F3": {"eval": {"settings": f3_settings}, "rows": f3_rows,
               "verdict": _overall([r["verdict"] for r in f3_rows])},
        "F4": {"clean_entropy": float(np.mean(clean_entropy)) if clean_entropy else None, "rows": f4,
               "verdict": _overall([r["verdict"] for r in f4])},
        "seconds": time.perf_counter() - t0,
    }


def _overall(verdicts: list[str]) -> str:
    if not verdicts:
        return "not measured"
    if all(v == "reproduced in direction" for v in verdicts):
        return "reproduced in direction"
    if any(v == "not reproduced" for v in verdicts):
        return "not reproduced" if all(v == "not reproduced" for v in verdicts) else "partly reproduced"
    if any(v == "reproduced in direction" for v in verdicts):
        return "partly reproduced (rest inconclusive)"
    return "inconclusive"


# --------------------------------------------------------------------------------------------------
# Rendering (from the JSON only)
# --------------------------------------------------------------------------------------------------


def _pct(x, digits=1):
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def _ci(ci, fmt="{:.2f}"):
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _p(p):
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def render_markdown(data: dict) -> str:
    """The findings tables from findings.json's data (no model, no measurement)."""
    env = data["environment"]
    ev = data.get("eval")
    setup = (f"problems: `{ev['problems']}` (first {ev['n_clean']} clean; each row gives its n), {ev['shots']} worked "
             f"examples, greedy, max_new_tokens {ev['max_new_tokens']}, batch {ev['batch_size']}, seed 0. ") if ev else ""
    lines = [f"<!-- generated by benchmarks/findings.py from {JSON_FILE}; do not edit by hand -->", "",
             f"Model: `{data['model']}`; mode: {data['mode']}; {setup}Machine: {env['nproc']} CPUs visible, torch "
             f"threads {env['torch_threads']}, device {env['device']}; wall time {data['wall_seconds'] / 60:.1f} min.", ""]
    f1 = data.get("F1")
    if f1:
        lines += ["### F1 — NVFP4 vs MXFP4, weight mode", "",
                  f"{f1['modules']} modules; NVFP4 − MXFP4 paired over modules, 95 % bootstrap interval "
                  "(resampling modules) and Wilcoxon signed-rank p.", "",
                  "| metric | NVFP4 (mean over modules) | MXFP4 | NVFP4 − MXFP4 [95 % CI] | Wilcoxon p | claim expects | direction |",
                  "|---|---|---|---|---|---|---|"]
        units = {"sqnr_db": ("SQNR (dB)", "{:.2f}", 1), "mse": ("MSE", "{:.3g}", 1),
                 "relative_error": ("mean relative error (%)", "{:.2f}", 100),
                 "deadzone_ratio": ("deadzone (%)", "{:.2f}", 100)}
        for m in F1_METRICS:
            iv = f1["paired"][m]
            label, fmt, k = units[m]
            lines.append(f"| {label} | {fmt.format(k * iv['mean_a'])} | {fmt.format(k * iv['mean_b'])} | "
                         f"{fmt.format(k * iv['mean_diff'])} {_ci([k * v for v in iv['ci']], fmt)} | "
                         f"{_p(iv['wilcoxon_p'])} | {'NVFP4 higher' if iv['expected_sign'] > 0 else 'NVFP4 lower'} | "
                         f"{iv['direction']} |")
        pn, pm = f1["pooled"]["nvfp4"], f1["pooled"]["mxfp4"]
        lines += ["", f"Pooled over all weights: SQNR {pn['sqnr_db']:.2f} vs {pm['sqnr_db']:.2f} dB, relative error "
                  f"{_pct(pn['relative_error'])} vs {_pct(pm['relative_error'])}, deadzone {_pct(pn['deadzone_ratio'])} "
                  f"vs {_pct(pm['deadzone_ratio'])} (NVFP4 vs MXFP4).", "", f"**Verdict: {f1['verdict']}.**", ""]
    f2 = data.get("F2")
    if f2:
        iv, sq = f2["paired_relative_error"], f2["paired_sqnr_db"]
        lines += [f"### F2 — W16A4 (input mode) vs W4A16 (weight mode), {f2['format'].upper()}", "",
                  "| | W16A4 (inputs) | W4A16 (weights) | inputs − weights [95 % CI] | Wilcoxon p | share of modules inputs worse |",
                  "|---|---|---|---|---|---|",
                  f"| mean relative error per module | {_pct(iv['mean_a'])} | {_pct(iv['mean_b'])} | "
                  f"{100 * iv['mean_diff']:.2f} pts {_ci([100 * v for v in iv['ci']])} | {_p(iv['wilcoxon_p'])} | "
                  f"{_pct(iv['share_a_greater'], 0)} |",
                  f"| SQNR (dB) | {sq['mean_a']:.2f} | {sq['mean_b']:.2f} | {sq['mean_diff']:.2f} {_ci(sq['ci'])} | "
                  f"{_p(sq['wilcoxon_p'])} | |", "",
                  f"{iv['n']} modules, paired. **Verdict: {f2['verdict']}.**", ""]
    ev = data.get("eval")
    if ev and "F3" in ev:
        f3 = ev["F3"]
        cl = f3["eval"]["settings"][0]
        lines += ["### F3 — operator-level relative noise on every matmul (evaluation: forward only)", "",
                  f"Clean: {cl['accuracy']['strict']:.1f} % strict {_ci(cl['wilson_ci']['strict'], '{:.1f}')} "
                  f"({cl['correct']['strict']}/{cl['n']}), {cl['accuracy']['flexible']:.1f} % flexible.", "",
                  "| setting | n | accuracy % [Wilson 95 %] | drop, pts [bootstrap 95 %] | exact interval | McNemar p | b / c | class (n_needed) | claim | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        by_spec = {s["spec"]: s for s in f3["eval"]["settings"]}
        for r in f3["rows"]:
            s = by_spec[r["setting"]]
            exact = _ci(r["exact_drop_ci"]) if r.get("exact_drop_ci") else "—"
            need = f" ({r['n_needed']})" if r.get("n_needed") else ""
            lines.append(f"| `{r['setting']}` | {r['n']} | {s['accuracy']['strict']:.1f} {_ci(s['wilson_ci']['strict'], '{:.1f}')} | "
                         f"{r['drop']:.1f} {_ci(r['drop_ci'], '{:.1f}')} | {exact} | {_p(r['mcnemar_p'])} | {r['b']} / {r['c']} | "
                         f"{r['robustness']}{need} | {r['claim']} | {r['verdict']} |")
        skipped = [x for x in ev.get("not_measured", []) if not x.startswith("aqn-")]
        if skipped:
            lines += ["", f"Not measured in this run (no complete chunk): {', '.join(f'`{x}`' for x in skipped)}."]
        lines += ["", f"**Verdict: {f3['verdict']}.**", ""]
    if ev and "F4" in ev:
        f4 = ev["F4"]
        lines += ["### F4 — AQN-style noise on linear weights vs on RMSNorm weights", "",
                  f"Entropy: mean next-token entropy (nats) of the model on its own completions of the first "
                  f"{ev['entropy_problems']} problems (teacher-forced), clean: "
                  f"{'—' if f4['clean_entropy'] is None else format(f4['clean_entropy'], '.3f')}; the Δ interval is an "
                  "unpaired bootstrap (different texts).", "",
                  "| noise on | sigma | n | accuracy % [Wilson 95 %] | drop, pts [bootstrap 95 %] | McNemar p | b / c | "
                  "entropy, nats (Δ vs clean [95 %]) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for r in f4["rows"]:
            c, e = r["comparison"]["strict"], r["entropy"]
            ent = "— (no completion tokens)" if e is None else f"{e['mean_a']:.3f} ({e['mean_diff']:+.3f} {_ci(e['ci'], '{:+.3f}')})"
            lines.append(f"| {r['layer_types']} | {r['sigma']:g} | {r['n']} | {r['accuracy']:.1f} {_ci(r['wilson_ci'], '{:.1f}')} | "
                         f"{c['drop']:.1f} {_ci(c['drop_ci'], '{:.1f}')} | {_p(c['mcnemar_p'])} | {c['b']} / {c['c']} | "
                         f"{ent} | {r['verdict']} |")
        skipped = [x for x in ev.get("not_measured", []) if x.startswith("aqn-")]
        if skipped:
            lines += ["", f"Not measured in this run (no complete chunk): {', '.join(skipped)}."]
        lines += ["", f"**Verdict: {f4['verdict']}.**", ""]
    return "\n".join(lines) + "\n"


def render_plots(data: dict, out: Path) -> list[str]:
    """PNG views of findings.json: F1/F2 per-module distributions, F3/F4 accuracy with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if data.get("F1"):
        f1 = data["F1"]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for ax, m in zip(axes, F1_METRICS):
            a = [r[m] for r in f1["rows"]["nvfp4"]]
            b = [r[m] for r in f1["rows"]["mxfp4"]]
            ax.scatter(b, a, s=8, alpha=0.6)
            lo, hi = min(min(a), min(b)), max(max(a), max(b))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xlabel(f"MXFP4 {m}")
            ax.set_ylabel(f"NVFP4 {m}")
            if m == "mse":
                ax.set_xscale("log")
                ax.set_yscale("log")
        fig.suptitle("F1: per-module NVFP4 vs MXFP4 (weight mode; above the diagonal = NVFP4 higher)")
        fig.tight_layout()
        written.append(_save(fig, out / "f1_nvfp4_vs_mxfp4.png"))
    if data.get("F2"):
        f2 = data["F2"]
        by_w = {r["name"]: r["relative_error"] for r in f2["rows"]["weight"]}
        pairs = [(by_w[r["name"]], r["relative_error"]) for r in f2["rows"]["input"] if r["name"] in by_w]
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ax.scatter([100 * p[0] for p in pairs], [100 * p[1] for p in pairs], s=8, alpha=0.6)
        hi = 100 * max(max(p) for p in pairs)
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel("W4A16 (weights) relative error %")
        ax.set_ylabel("W16A4 (inputs) relative error %")
        ax.set_title(f"F2: per module, {f2['format'].upper()}")
        fig.tight_layout()
        written.append(_save(fig, out / "f2_inputs_vs_weights.png"))
    ev = data.get("eval") or {}
    if "F3" in ev:
        labels, acc, lo, hi = [], [], [], []
        for s in ev["F3"]["eval"]["settings"]:
            labels.append(s["spec"].replace("@ops", ""))
            acc.append(s["accuracy"]["strict"])
            lo.append(s["wilson_ci"]["strict"][0])
            hi.append(s["wilson_ci"]["strict"][1])
        for r in ev.get("F4", {}).get("rows", []):
            labels.append(f"AQN {r['layer_types']} {r['sigma']:g}")
            acc.append(r["accuracy"])
            lo.append(r["wilson_ci"][0])
            hi.append(r["wilson_ci"][1])
        fig, ax = plt.subplots(figsize=(9, 4))
        x = np.arange(len(labels))
        ax.errorbar(x, acc, yerr=[np.subtract(acc, lo), np.subtract(hi, acc)], fmt="o", capsize=4)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylabel("accuracy % (strict), Wilson 95 %")
        ax.set_title(f"F3/F4: {ev['problems']}, n={ev['n']} per setting")
        ax.axhline(acc[0], color="grey", lw=0.8, ls="--")
        fig.tight_layout()
        written.append(_save(fig, out / "f3_f4_accuracy.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render(out: Path) -> list[str]:
    """Rebuild every view in ``out`` from the JSON there; returns the files written."""
    written = []
    path = out / JSON_FILE
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        write_text(out / MD_FILE, render_markdown(data))
        written += [MD_FILE] + render_plots(data, out)
    tpath = out / TRAIN_JSON_FILE
    if tpath.is_file():
        tdata = json.loads(tpath.read_text(encoding="utf-8"))
        write_text(out / "train.md", render_train_markdown(tdata))
        written += ["train.md"] + render_train_plot(tdata, out)
    if not written:
        raise FileNotFoundError(f"nothing to render in {out}: neither {JSON_FILE} nor {TRAIN_JSON_FILE} is there")
    return written


# --------------------------------------------------------------------------------------------------
# F5: training
# --------------------------------------------------------------------------------------------------

# Settings by mode. "quick": the end-to-end smoke test (tests/test_findings_train.py): 4 steps (2 per
# epoch: epoch-aware AQN's first stage of each epoch is a sigma-0 warm-up), 4 held-out problems, 8 tokens. "cpu": the 2-core recipe. "gpu" (--device cuda): one H200, bundled model or a
# Qwen2.5-0.5B/1.5B-class HF directory (--model PATH). Epoch-aware AQN restarts its schedule each epoch,
# so every mode trains 2 epochs. Why these settings: docs/findings.md, F5 (the pilot table).
TRAIN_MODES = {
    "quick": {"prompts_per_step": 1, "group": 2, "steps_per_epoch": 2, "epochs": 2, "n_eval": 4,
              "max_completion_length": 8, "eval_max_new_tokens": 8, "eval_every": 0, "eval_batch_size": 4,
              "pilot_lrs": (3e-4,), "pilot_steps": 1, "lora_rank": 8},
    "cpu": {"prompts_per_step": 2, "group": 8, "steps_per_epoch": 6, "epochs": 2, "n_eval": 48,
            "max_completion_length": 32, "eval_max_new_tokens": 32, "eval_every": 10, "eval_batch_size": 16,
            "pilot_lrs": (2e-4, 5e-4), "pilot_steps": 8, "lora_rank": 16},
    "gpu": {"prompts_per_step": 8, "group": 8, "steps_per_epoch": 30, "epochs": 2, "n_eval": 400,
            "max_completion_length": 48, "eval_max_new_tokens": 48, "eval_every": 10, "eval_batch_size": 64,
            "pilot_lrs": (1e-4, 3e-4, 5e-4), "pilot_steps": 20, "lora_rank": 16},
}
TRAIN_DATA = "arith:level=1"
# Zero-shot prompts (the library's chat prompt: its instruction, then the question) with one short line
# on the answer's form: a short prompt keeps the training forward/backward cheap (the earlier 2-shot
# pilot spent ~100 s a step). Pilot A asked for "only the final line" with a 0.5 format bonus: GRPO
# learned the format in ~8 steps and then answered with a number copied from the question (held-out
# 6.25 -> 0 %), so the line now asks for the one-line calculation first and the bonus is small.
TRAIN_SUFFIX = "\nWrite the calculation in one line, then the line '#### <number>'."
# The held-out metric: strict '#### N' (lm-eval's gsm8k). The reward (pilot C, docs/findings.md): 1 for a right
# last number (flexible), + 0.5 when it is also the '#### N' line. A bonus for the form alone was learned first
# in pilots A and B and then paid for '#### <a number copied from the question>'; paid only with the right
# number it teaches the form without that shortcut, and the flexible part gives a signal where the start
# model rarely writes the line (greedy, zero-shot: 21 % flexible, 4 % strict on 24 held-out problems).
TRAIN_METRIC = "strict"
# Also reported (the same greedy completions): the last number of the completion (lm-eval's flexible filter),
# which moves first when the model learns to compute before it learns the '#### N' line.
SECOND_METRIC = "flexible"
TRAIN_REWARD = {"mode": "flexible", "format_bonus": 0.5, "bonus_only_if_correct": True}
# Sampling temperature of the rollouts: at 1.0 the 135M model's samples are mostly noise (zero-shot, 24 problems
# x 8 samples: 4 % flexible-right, 0 strict; greedy 21 %), so GRPO's groups rarely hold a right answer.
TRAIN_TEMPERATURE = 0.5
TRAIN_LR = 3e-4  # a LoRA learning rate; the pilot stage picks among TRAIN_MODES[mode]["pilot_lrs"]
TRAIN_NOISE = 0.05
NOISE_SPEC = f"relative:{TRAIN_NOISE:g}@ops"
MXFP4_SPEC = "weights:mxfp4"
# The hardware conditions: what a run trains under and what it is evaluated under.
CONDITIONS = {"noise": {"rollout": NOISE_SPEC, "training": NOISE_SPEC},  # forward and backward
              "mxfp4": {"rollout": MXFP4_SPEC, "training": None}}         # W4A16 rollouts (QeRL)
AQN_EPOCH_AWARE = {"enabled": True, "schedule": "epoch_aware", "sigma_start": 1e-2, "sigma_end": 5e-4,
                   "stages": 3, "targets": ["rmsnorm"]}
TRAIN_RUNS = ("baseline", "noise", "noise+aqn", "mxfp4", "mxfp4+aqn")
RUN_CONDITION = {"baseline": None, "noise": "noise", "noise+aqn": "noise", "mxfp4": "mxfp4", "mxfp4+aqn": "mxfp4"}
EVAL_SETTINGS = {"clean": "clean", "noise": NOISE_SPEC, "mxfp4": MXFP4_SPEC}
TRAIN_FILE = "train-problems.jsonl"
TRAIN_EVAL_FILE = "heldout-problems.jsonl"
# Learning curves kept from TRL's log (train.json, as [step, value] pairs): the learning signal, what
# limits it, and what each condition applied (rollout/* and training/* are the emulation's own
# statistics; aqn/* the noise drawn; sampling/* the rollout-training log-prob difference, vLLM only).
TRAIN_CURVES = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "entropy", "loss", "grad_norm", "step_time", "eval/accuracy_strict",
                "aqn/sigma", "aqn/effective_std", "sampling/sampling_logp_difference/mean",
                "sampling/sampling_logp_difference/max")
APPLIED_PREFIXES = ("rollout/", "training/", "aqn/")


def write_train_problems(out: Path, spec: str, n_train: int, n_eval: int, suffix: str = TRAIN_SUFFIX) -> dict:
    """GSM8K-format problem files (question + ``suffix``): training from the train stream's first
    ``n_train`` problems, held out from the test stream's first ``n_eval`` questions that are not training
    questions (a generator of small problems repeats some; they are dropped, as hwnoise.rl does).

    Args:
        out: folder for the two files (created).
        spec: problem set (``hwnoise.data.load_problems``), e.g. ``"arith:level=1"``.
        n_train, n_eval: problems in each file.
        suffix: text appended to every question (the same in training and evaluation).

    Example:
        >>> info = write_train_problems(Path("/tmp/p"), "arith:level=1", 4, 4)  # doctest: +SKIP
        >>> sorted(info)[:2]
        ['eval', 'eval_ids']
    """
    from hwnoise.data import load_problems

    train = load_problems(spec, n=n_train, split="train")
    seen = {p.question for p in train}
    drawn = load_problems(spec, n=2 * n_eval + 16, split="test")
    held = [p for p in drawn if p.question not in seen][:n_eval]
    if len(held) < n_eval:
        raise ValueError(f"{spec!r}: only {len(held)} of the test stream's first {len(drawn)} questions are not "
                         f"also in the train stream's first {len(train)}; n_eval is {n_eval}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, problems in ((TRAIN_FILE, train), (TRAIN_EVAL_FILE, held)):
        rows = [json.dumps({"question": p.question + suffix, "answer": p.answer, "source_id": p.id}) for p in problems]
        write_text(out / name, "\n".join(rows) + "\n")
        paths[name] = str(out / name)
    return {"train": paths[TRAIN_FILE], "eval": paths[TRAIN_EVAL_FILE], "train_ids": [p.id for p in train],
            "eval_ids": [p.id for p in held], "suffix": suffix}


def train_mode(args) -> str:
    return "quick" if args.quick else "gpu" if args.device == "cuda" else "cpu"


def train_settings(args) -> dict:
    """The mode's settings with the command line's overrides."""
    m = dict(TRAIN_MODES[train_mode(args)])
    if args.train_steps:  # steps per run: keep 2 epochs
        m["steps_per_epoch"] = max(1, args.train_steps // m["epochs"])
    if args.train_n_eval:
        m["n_eval"] = args.train_n_eval
    if args.train_tokens:
        m["max_completion_length"] = m["eval_max_new_tokens"] = args.train_tokens
    return m


def _save_steps(total: int) -> int:
    """Checkpoint every few steps (resumable), on a divisor of the run's steps so the last step is saved."""
    return next(d for d in range(min(5, total), 0, -1) if total % d == 0)


def _base_config(args, m: dict, files: dict, lr: float) -> dict:
    steps = m["steps_per_epoch"] * m["epochs"]
    return {
        "model": args.model, "seed": 0, "device": args.device, "threads": args.threads, "epochs": m["epochs"],
        "finetune": args.train_finetune,
        "lora": {"rank": m["lora_rank"], "alpha": 2 * m["lora_rank"]},
        "rollout": {"engine": args.train_engine},
        "data": {"train": files["train"], "n_train": m["steps_per_epoch"] * m["prompts_per_step"],
                 "eval": files["eval"], "n_eval": m["n_eval"]},
        "algorithm": {"num_generations": m["group"], "batch_size": m["group"] * m["prompts_per_step"],
                      "max_completion_length": m["max_completion_length"], "learning_rate": lr,
                      "temperature": TRAIN_TEMPERATURE, "loss_type": "dapo",
                      # off in every run: hwnoise refuses training-phase emulation under checkpointing (the
                      # recomputed forward would run outside the emulation), and the runs must match.
                      "gradient_checkpointing": False},
        "reward": dict(TRAIN_REWARD),
        # at_start off: the start is evaluated once for all runs (train/evals/start); the last step always is.
        "eval": {"at_start": False, "every": m["eval_every"], "max_new_tokens": m["eval_max_new_tokens"],
                 "batch_size": m["eval_batch_size"]},
        "logging": {"report_to": ["none"], "save_steps": _save_steps(steps)},
    }


def run_config(name: str, base: dict, run_dir: Path):
    """One run's TrainConfig: the base plus its condition (emulation) and AQN, validated."""
    from hwnoise.rl import TrainConfig

    d = json.loads(json.dumps(base))
    cond = RUN_CONDITION.get(name)
    if cond:
        d["emulation"] = dict(CONDITIONS[cond])
    if name.endswith("+aqn"):
        d["aqn"] = dict(AQN_EPOCH_AWARE)
    d["run_dir"] = str(run_dir)
    return TrainConfig.from_dict(d).validate()


def train_configs(args, out: Path, lr: float | None = None) -> list:
    """The runs as (name, TrainConfig), validated before anything loads."""
    m = train_settings(args)
    files = write_train_problems(out / "train" / "problems", TRAIN_DATA, m["steps_per_epoch"] * m["prompts_per_step"],
                                 m["n_eval"])
    base = _base_config(args, m, files, lr or args.train_lr or TRAIN_LR)
    return [(name, run_config(name, base, out / "train" / name)) for name in args.train_runs]


def pilot_configs(args, out: Path) -> list:
    """The pilot stage: short baseline runs, one per learning rate, as (lr, TrainConfig)."""
    m = train_settings(args)
    files = write_train_problems(out / "train" / "problems", TRAIN_DATA, m["steps_per_epoch"] * m["prompts_per_step"],
                                 m["n_eval"])
    lrs = args.pilot_lrs or m["pilot_lrs"]
    configs = []
    for lr in lrs:
        base = _base_config(args, m, files, lr)
        base.pop("epochs")
        base["steps"] = m["pilot_steps"]
        base["logging"]["save_steps"] = _save_steps(m["pilot_steps"])
        configs.append((lr, run_config("baseline", base, out / "train" / f"pilot-lr{lr:g}")))
    return configs


class _Budget:
    """The time budget (--train-budget-min): parts check it before they start; training stops at the
    next step once it is spent, saving a checkpoint that a rerun resumes."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def callback(self):
        from transformers import TrainerCallback

        budget = self

        class StopOnBudget(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if budget.spent():
                    control.should_training_stop = True
                    control.should_save = True

        return StopOnBudget()


def _run_done(run_dir: Path) -> bool:
    path = run_dir / "run.json"
    if not path.is_file():
        return False
    state = json.loads(path.read_text(encoding="utf-8"))
    return state.get("status") == "finished" and state.get("steps") == state.get("max_steps")


def _train_one(config, budget: _Budget, log) -> dict | None:
    """Train (or continue) one run; None when the budget stopped it before its last step."""
    from hwnoise.rl import train
    from hwnoise.rl.run import latest_checkpoint

    run_dir = Path(config.run_dir)
    if not _run_done(run_dir):
        if budget.spent():
            return None
        resume = "latest" if latest_checkpoint(run_dir) else None
        if resume is None:
            _clear_unsaved_run(run_dir)
        log(f"F5: training {run_dir.name}" + (" (resuming)" if resume else ""))
        train(config, resume=resume, callbacks=[budget.callback()])
        if not _run_done(run_dir):
            return None
    return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))


def _clear_unsaved_run(run_dir: Path) -> None:
    """A run stopped before its first checkpoint cannot be resumed, and hwnoise.rl refuses a fresh run
    over it: remove what that run wrote (only hwnoise train's own outputs, by name) so it starts again."""
    import shutil

    from hwnoise.rl.run import train_outputs

    for name in train_outputs():
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()


def _end_model(config):
    """The trained model at the run's last checkpoint (LoRA merged), on the run's device."""
    from hwnoise.models import load
    from hwnoise.rl.run import latest_checkpoint

    ckpt = latest_checkpoint(config.run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{config.run_dir}: no checkpoint-N to evaluate (logging.save_steps is 0?)")
    device = config.resolved_device()
    if config.finetune == "lora":
        from peft import PeftModel

        model, tok = load(config.model, device=device)
        model = PeftModel.from_pretrained(model, ckpt).merge_and_unload()
    else:
        from transformers import AutoModelForCausalLM

        _, tok = load(config.model, device=device)
        model = AutoModelForCausalLM.from_pretrained(ckpt).to(device)
    model.eval()
    return model, tok


def _evaluate_settings(model, tok, config, out_dir: Path, settings: list[str], log) -> dict:
    """hn.evaluate on the run's held-out problems under each setting; records in out_dir (resumable)."""
    import hwnoise as hn
    from hwnoise.data import load_problems

    problems = load_problems(config.data.eval)[: config.data.n_eval]
    log(f"F5: evaluating {out_dir.name} ({', '.join(settings)}; n={len(problems)})")
    hn.evaluate(model, tok, problems, settings, batch_size=config.eval.batch_size,
                max_new_tokens=config.eval.max_new_tokens, seed=0, metric=TRAIN_METRIC, out=out_dir,
                model_name=str(config.model), data_name=config.data.eval)
    return _correct_by_setting(out_dir)


def _correct_by_setting(out_dir: Path, metric: str = TRAIN_METRIC) -> dict[str, list[bool]]:
    """Per setting spec: per held-out problem (sorted by id), correct under ``metric``."""
    from hwnoise.eval.core import read_records

    records = read_records(out_dir / "records.jsonl")
    specs = sorted({k[0] for k in records})
    return {s: [records[k][f"correct_{metric}"] for k in sorted(k for k in records if k[0] == s)]
            for s in specs}


def _cached_eval(out_dir: Path, settings: list[str], make_model, config, log) -> dict:
    done = out_dir / "run.json"
    if done.is_file():
        got = _correct_by_setting(out_dir)
        if all(s in got and len(got[s]) == config.data.n_eval for s in settings):
            return got
    model, tok = make_model()
    return _evaluate_settings(model, tok, config, out_dir, settings, log)


def _paired(name: str, ref: list[bool], other: list[bool], metric: str = TRAIN_METRIC) -> dict:
    """other - ref in points, paired (bootstrap 95 %, exact McNemar, hwnoise.eval's n_needed)."""
    from hwnoise.eval.stats import compare, wilson_interval

    c = compare(name, ref, other, metric=metric)
    k = int(np.sum(other))
    return {"ref_accuracy": c.clean_accuracy, "accuracy": c.accuracy, "difference": 0.0 - c.drop,  # no -0.0
            "ci": [0.0 - c.drop_ci[1], 0.0 - c.drop_ci[0]], "mcnemar_p": c.mcnemar_p, "gained": c.c, "lost": c.b,
            "n": c.n, "n_needed": c.n_needed, "class": c.robustness,
            "wilson_ci": list(wilson_interval(k, len(other)))}


def _verdict(p: dict, claim_sign: int = 1) -> str:
    low, high = p["ci"]
    if p["mcnemar_p"] < ALPHA and (low > 0 if claim_sign > 0 else high < 0):
        return "as claimed"
    if p["mcnemar_p"] < ALPHA and (high < 0 if claim_sign > 0 else low > 0):
        return "opposite"
    need = f"; n_needed {p['n_needed']}" if p.get("n_needed") else ""
    return f"inconclusive (n={p['n']}{need})"


def curves_of(state: dict) -> dict:
    """TRAIN_CURVES (and every rollout/, training/, aqn/ key: what the condition applied) from the log
    history hwnoise.rl.train keeps in run.json, as {key: [[step, value], ...]}."""
    out: dict = {}
    for h in state.get("log_history", []):
        for key, value in h.items():
            if (key in TRAIN_CURVES or key.startswith(APPLIED_PREFIXES)) and isinstance(value, (int, float)):
                out.setdefault(key, []).append([int(h.get("step", 0)), float(value)])
    return out


def run_train(args, out: Path, log) -> dict:
    """The F5 recipe: pilot stage (a learning rate), the runs, the evaluations, the comparisons.
    Every part writes its own result; a rerun skips what is done. Returns train.json's content."""
    t0 = time.perf_counter()
    budget = _Budget(args.train_budget_min)
    m = train_settings(args)
    data = {"schema_version": SCHEMA_VERSION, "model": str(args.model), "device": args.device,
            "mode": train_mode(args), "engine": args.train_engine, "finetune": args.train_finetune,
            "settings": m, "train_data": f"{TRAIN_DATA} (train stream), zero-shot + {TRAIN_SUFFIX.strip()!r}",
            "eval_data": f"{TRAIN_DATA} (test stream, training questions dropped)", "metric": TRAIN_METRIC,
            "reward": TRAIN_REWARD, "temperature": TRAIN_TEMPERATURE, "conditions": CONDITIONS,
            "aqn": AQN_EPOCH_AWARE, "argv": sys.argv[1:], "environment": environment(args), "claim": CLAIMS["F5"],
            "incomplete": []}
    configs = train_configs(args, out)  # every run's config is checked before the first model loads
    # -- the start (the same bundled model for every run), clean and under each condition
    ref = configs[0][1]
    conditions = sorted({RUN_CONDITION[n] for n, _ in configs if RUN_CONDITION[n]})
    settings = ["clean"] + [EVAL_SETTINGS[c] for c in conditions]

    def base_model():
        from hwnoise.models import load

        model, tok = load(ref.model, device=ref.resolved_device())
        model.eval()
        return model, tok

    eval_root = out / "train" / "evals"
    start = _cached_eval(eval_root / "start", settings, base_model, ref, log)
    data["start"] = {s: 100.0 * float(np.mean(v)) for s, v in start.items()}
    start2 = _correct_by_setting(eval_root / "start", SECOND_METRIC)
    data["start_" + SECOND_METRIC] = {s: 100.0 * float(np.mean(v)) for s, v in start2.items()}
    # -- pilot stage: the learning rate at which the baseline learns (skipped when --train-lr is given)
    lr = args.train_lr
    data["pilot"] = []
    if lr is None:
        for plr, pconf in pilot_configs(args, out):
            t = time.perf_counter()
            state = _train_one(pconf, budget, log)
            if state is None:
                data["incomplete"].append(f"pilot-lr{plr:g}")
                continue
            end = _cached_eval(Path(pconf.run_dir) / "end-eval", ["clean"], lambda c=pconf: _end_model(c), pconf, log)
            p = _paired(f"pilot-lr{plr:g}", start["clean"], end["clean"])
            end2 = _correct_by_setting(Path(pconf.run_dir) / "end-eval", SECOND_METRIC)
            p2 = _paired(f"pilot-lr{plr:g}", start2["clean"], end2["clean"], SECOND_METRIC)
            rew = [v for _, v in curves_of(state).get("reward", [])]
            half = max(1, len(rew) // 2)
            data["pilot"].append({"lr": plr, "name": f"pilot-lr{plr:g}", "steps": state["steps"], "learning": p,
                                  "learning_" + SECOND_METRIC: p2,
                                  "curves": curves_of(state),
                                  "reward_first_half": float(np.mean(rew[:half])) if rew else None,
                                  "reward_second_half": float(np.mean(rew[half:])) if rew[half:] else None,
                                  "train_seconds": state.get("seconds"), "wall_seconds": time.perf_counter() - t})
        if data["pilot"]:
            best = max(data["pilot"], key=lambda r: (r["learning"]["difference"],
                                                     r["learning_" + SECOND_METRIC]["difference"],
                                                     (r["reward_second_half"] or 0) - (r["reward_first_half"] or 0)))
            lr = best["lr"]
    data["learning_rate"] = lr or TRAIN_LR
    if lr is not None and lr != (args.train_lr or TRAIN_LR):
        configs = train_configs(args, out, lr=lr)
    # -- the runs, each evaluated at its end clean and under every condition
    runs, finals, finals2 = [], {}, {}
    for name, config in configs:
        state = _train_one(config, budget, log)
        if state is None:
            data["incomplete"].append(name)
            continue
        end = _cached_eval(Path(config.run_dir) / "end-eval", settings, lambda c=config: _end_model(c), config, log)
        finals[name] = end
        end2 = _correct_by_setting(Path(config.run_dir) / "end-eval", SECOND_METRIC)
        finals2[name] = end2
        cond = RUN_CONDITION[name]
        run = {"name": name, "condition": cond, "emulation": {"rollout": config.emulation.rollout,
                                                               "training": config.emulation.training},
               "aqn": config.aqn.enabled and {"schedule": config.aqn.schedule, "sigma_start": config.aqn.sigma_start,
                                              "sigma_end": config.aqn.sigma_end, "targets": list(config.aqn.targets)},
               "steps": state["steps"], "train_seconds": state.get("seconds"),
               "seconds_per_step": (state.get("seconds") or 0) / max(1, state["steps"]),
               "curves": curves_of(state),
               "end": {s: 100.0 * float(np.mean(v)) for s, v in end.items()},
               "end_" + SECOND_METRIC: {s: 100.0 * float(np.mean(v)) for s, v in end2.items()},
               "learning": _paired(name, start["clean"], end["clean"]),
               "learning_" + SECOND_METRIC: _paired(name, start2["clean"], end2["clean"], SECOND_METRIC)}
        if cond:
            spec = EVAL_SETTINGS[cond]
            run["learning_under_condition"] = _paired(name, start[spec], end[spec])
        runs.append(run)
    data["runs"] = runs
    # -- for each condition: under it, baseline-trained vs condition-trained vs condition + AQN
    comps = []
    for cond in conditions:
        spec = EVAL_SETTINGS[cond]
        for evaluated in ("clean", spec):
            for a, b in (("baseline", cond), (cond, f"{cond}+aqn"), ("baseline", f"{cond}+aqn")):
                if a in finals and b in finals:
                    p = _paired(f"{b} vs {a}", finals[a][evaluated], finals[b][evaluated])
                    p2 = _paired(f"{b} vs {a}", finals2[a][evaluated], finals2[b][evaluated], SECOND_METRIC)
                    comps.append({"condition": cond, "evaluated": evaluated, "a": a, "b": b, **p,
                                  "verdict": _verdict(p), SECOND_METRIC: {**p2, "verdict": _verdict(p2)}})
    data["comparisons"] = comps
    data["verdict"] = _f5_verdict(data)
    data["wall_seconds"] = time.perf_counter() - t0
    return data


def _f5_verdict(data: dict) -> dict:
    """Plain verdicts: does the baseline learn; for each condition, does AQN recover (cond+aqn vs cond,
    evaluated under the condition)."""
    out = {}
    base = next((r for r in data.get("runs", []) if r["name"] == "baseline"), None)
    out["baseline_learns"] = _verdict(base["learning"]) if base else "not run"
    out[f"baseline_learns_{SECOND_METRIC}"] = _verdict(base["learning_" + SECOND_METRIC]) if base else "not run"
    for c in data.get("comparisons", []):
        if c["evaluated"] != "clean" and c["a"] == c["condition"] and c["b"] == f"{c['condition']}+aqn":
            out[f"aqn_recovers_{c['condition']}"] = c["verdict"]
            out[f"aqn_recovers_{c['condition']}_{SECOND_METRIC}"] = c[SECOND_METRIC]["verdict"]
    if data.get("incomplete"):
        out["incomplete"] = ", ".join(data["incomplete"])
    return out


def _pts(p: dict) -> str:
    return f"{p['difference']:+.1f} {_ci(p['ci'], '{:+.1f}')}, p {_p(p['mcnemar_p'])} ({p['gained']} / {p['lost']})"


def _reward_words(data: dict) -> str:
    r = data.get("reward") or {"mode": data["metric"], "format_bonus": data.get("format_bonus", 0.0)}
    bonus = (f" + {r['format_bonus']:g} for the '#### N' line" + (" when right" if r.get("bonus_only_if_correct") else "")
             if r.get("format_bonus") else "")
    return f"{r['mode']} correctness{bonus}"


def render_train_markdown(data: dict) -> str:
    """train.md: the pilot, the runs, the paired comparisons and verdicts, from train.json alone."""
    m = data["settings"]
    lines = [f"<!-- generated by benchmarks/findings.py --train from {TRAIN_JSON_FILE} -->", "",
             f"Model `{data['model']}`, device {data['device']}, mode {data['mode']}, rollouts {data['engine']}, "
             f"{data['finetune']} (LoRA r {m['lora_rank']}); train {data['train_data']} "
             f"({m['steps_per_epoch'] * m['prompts_per_step']} problems × {m['epochs']} epochs, "
             f"{m['prompts_per_step']} prompts × {m['group']} completions × {m['max_completion_length']} tokens per "
             f"step); held-out {data['eval_data']} (n={m['n_eval']}, {data['metric']}, greedy, "
             f"{m['eval_max_new_tokens']} tokens); reward {_reward_words(data)}, "
             f"temperature {data['temperature']:g}, LR {data['learning_rate']:g}; training time "
             f"{sum((r.get('train_seconds') or 0) for r in data.get('pilot', []) + data.get('runs', [])) / 60:.1f} min "
             f"(all invocations; this one's wall {data['wall_seconds'] / 60:.1f} min).",
             "", "Start (the same model for every run): " + ", ".join(f"{k} {v:.1f} %" for k, v in data["start"].items())
             + f"; {SECOND_METRIC}: " + ", ".join(f"{k} {v:.1f} %" for k, v in data.get("start_" + SECOND_METRIC, {}).items())
             + ".", "", f"Each cell: {TRAIN_METRIC} (the held-out metric); the {SECOND_METRIC} figure of the same "
             "completions follows after a slash where given."]
    if data.get("pilot"):
        lines += ["", "Pilot (baseline, short runs; the LR with the largest held-out gain is used):", "",
                  "| LR | steps | held-out % start → end, Δ pts [95 %], McNemar p (gained / lost) | "
                  f"{SECOND_METRIC}: the same | reward 1st → 2nd half | training min |",
                  "|---|---|---|---|---|---|"]
        for r in data["pilot"]:
            p = r["learning"]
            rw = (f"{r['reward_first_half']:.3f} → {r['reward_second_half']:.3f}"
                  if r["reward_second_half"] is not None else "—")
            p2 = r.get("learning_" + SECOND_METRIC)
            f2 = f"{p2['ref_accuracy']:.1f} → {p2['accuracy']:.1f}, {_pts(p2)}" if p2 else "—"
            lines.append(f"| {r['lr']:g} | {r['steps']} | {p['ref_accuracy']:.1f} → {p['accuracy']:.1f}, {_pts(p)} | "
                         f"{f2} | {rw} | {(r.get('train_seconds') or 0) / 60:.1f} |")
    if data.get("runs"):
        specs = list(data["start"])
        lines += ["", "| run | steps | s/step | " + " | ".join(f"end, {s} %" for s in specs)
                  + f" | learning (clean end − start) | {SECOND_METRIC}: the same | under its condition |",
                  "|---|---|---|" + "---|" * len(specs) + "---|---|---|"]
        for r in data["runs"]:
            uc = _pts(r["learning_under_condition"]) if r.get("learning_under_condition") else "—"
            e2 = r.get("end_" + SECOND_METRIC, {})
            l2 = _pts(r["learning_" + SECOND_METRIC]) if r.get("learning_" + SECOND_METRIC) else "—"
            lines.append(f"| {r['name']} | {r['steps']} | {r['seconds_per_step']:.0f} | "
                         + " | ".join(f"{r['end'].get(s, float('nan')):.1f}"
                                      + (f" / {e2[s]:.1f}" if s in e2 else "") for s in specs)
                         + f" | {_pts(r['learning'])} | {l2} | {uc} |")
    if data.get("comparisons"):
        lines += ["", "Paired at the end (b − a, points; same held-out problems):", "",
                  "| condition | evaluated | a | b | a % → b % | b − a [95 %], McNemar p (gained / lost) | verdict | "
                  f"{SECOND_METRIC}: a % → b %, b − a | {SECOND_METRIC} verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in data["comparisons"]:
            c2 = c.get(SECOND_METRIC)
            f2 = (f"{c2['ref_accuracy']:.1f} → {c2['accuracy']:.1f}, {_pts(c2)} | {c2['verdict']}" if c2 else "— | —")
            lines.append(f"| {c['condition']} | {c['evaluated']} | {c['a']} | {c['b']} | {c['ref_accuracy']:.1f} → "
                         f"{c['accuracy']:.1f} | {_pts(c)} | {c['verdict']} | {f2} |")
    lines += ["", "Verdicts: " + "; ".join(f"{k}: {v}" for k, v in data.get("verdict", {}).items()) + "."]
    return "\n".join(lines) + "\n"


def render_train_plot(data: dict, out: Path) -> list[str]:
    """train.json's learning curves: reward, held-out accuracy, AQN sigma, rollout-training log-prob difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = (data.get("runs") or []) + [r for r in data.get("pilot") or [] if r.get("curves")]
    if not runs:
        return []
    panels = (("reward", "mean reward per step"), ("eval/accuracy_strict", "held-out accuracy % (strict)"),
              ("aqn/sigma", "AQN sigma"), ("sampling/sampling_logp_difference/mean", "rollout − training log-prob diff"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, panels):
        drawn = False
        for r in runs:
            pts = r["curves"].get(key) or []
            if key == "eval/accuracy_strict":
                pts = [[0, data["start"]["clean"]]] + pts
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=r["name"])
                drawn = True
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged\n(HF rollouts / no AQN)", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"F5 ({data['device']}, {data['mode']}, {data['engine']} rollouts)")
    fig.tight_layout()
    return [_save(fig, out / "f5_curves.png")]

# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def environment(args) -> dict:
    import torch

    return {"nproc": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "device": args.device, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)

    if args.render_only:
        try:
            written = render(out)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        log(f"rendered {', '.join(written)} in {out}")
        return 0

    import logging

    import torch

    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    if args.train:
        data = run_train(args, out, log)
        write_json(out / TRAIN_JSON_FILE, data)
        log(f"wrote {out / TRAIN_JSON_FILE}; rendering")
        render(out)
        return 0

    from hwnoise.models import load

    env = environment(args)
    loaded = []

    def model_and_tokenizer():  # loaded on first need: an --assemble run over cached results loads nothing
        if not loaded:
            loaded.extend(load(args.model, device=args.device))
            log(f"model {args.model} loaded; torch threads {torch.get_num_threads()}, nproc {env['nproc']}")
        return loaded

    samples = MODES[args.mode]["scan_samples"]
    data = {"schema_version": SCHEMA_VERSION, "model": str(args.model), "mode": args.mode, "claims": CLAIMS,
            "source": SOURCE, "environment": env, "argv": sys.argv[1:]}
    for key, measure, what in (("F1", measure_f1, "scans nvfp4 / mxfp4 (weight mode)"),
                               ("F2", measure_f2, "scans mxfp4 input / weight mode")):
        if key not in args.only:
            continue
        cache = out / "runs" / f"{key.lower()}-samples{samples}.json"  # a rerun reuses the scans
        if cache.is_file():
            data[key] = json.loads(cache.read_text(encoding="utf-8"))
            log(f"{key}: reused {cache}")
            continue
        log(f"{key}: {what}")
        data[key] = measure(*model_and_tokenizer(), samples)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, data[key])
    if "F3" in args.only or "F4" in args.only:
        model, tokenizer = model_and_tokenizer() if not args.assemble else (None, None)
        evals = evaluate_runs(model, tokenizer, args, out, log, which=args.only, generate=not args.assemble)
        if evals is None:
            log("F3 and F4 pair on the same clean run: this run only filled its run directories; "
                "run both (the default) to assemble findings.json")
            return 0
        data["eval"] = evals
    data["wall_seconds"] = time.perf_counter() - t_start
    data["environment"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_json(out / JSON_FILE, data)
    log(f"wrote {out / JSON_FILE}; rendering")
    written = render(out)
    log(f"done in {data['wall_seconds'] / 60:.1f} min: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
