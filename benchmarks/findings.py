"""What hwnoise reproduces of the research's findings: measure F1-F4 (and prepare F5), JSON first.

One command regenerates every table and figure of docs/findings.md:

    python benchmarks/findings.py --out DIR [--quick] [--model PATH]   # F1-F4 -> DIR/findings.json, .md, .png
    python benchmarks/findings.py --out DIR --render-only              # rebuild the Markdown/PNGs from the JSON
    python benchmarks/findings.py --out DIR --train [--quick]          # F5: baseline / 5 % noise / noise + AQN

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
- F5 (``--train``): ``hwnoise.rl.train`` three times (baseline, 5 % relative operator noise in rollout
  and training, the same plus epoch-aware AQN), held-out accuracy before and after, paired. The
  prompts are few-shot: GSM8K-format problem files (DIR/train/problems/) whose questions carry the
  same worked examples as F3/F4 (train stream), training on the train stream, held out from the test
  stream; reward and metric strict ``#### N``. ``--quick`` is the CPU pilot; ``--train-runs`` picks
  runs, ``--train-lr`` the learning rate.

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
    ap.add_argument("--train", action="store_true", help="F5: the baseline / 5 %% noise / noise + AQN training triple")
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
    ap.add_argument("--train-lr", type=float, default=None, help=f"F5: learning rate (default {TRAIN_LR:g})")
    ap.add_argument("--train-runs", default=",".join(TRAIN_RUNS), help="F5: which runs, in order (a subset of "
                    f"{','.join(TRAIN_RUNS)}; finished runs in DIR are reused, not retrained)")
    args = ap.parse_args(argv)
    errors = []
    for name in ("n", "max_new_tokens", "batch_size", "threads", "train_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.train_lr is not None and not args.train_lr > 0:
        errors.append(f"--train-lr must be > 0; got {args.train_lr:g}")
    runs = [r.strip() for r in args.train_runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in TRAIN_RUNS]
    if unknown or not runs:
        errors.append(f"--train-runs: expected a subset of {','.join(TRAIN_RUNS)}; got {args.train_runs!r}")
    args.train_runs = tuple(runs)
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


def _curve_text(values, fmt="{:.2f}") -> str:
    return " ".join(fmt.format(v) for v in values) if values else "—"


def render_train_markdown(data: dict) -> str:
    metric = data.get("metric", "flexible")
    lines = [f"<!-- generated by benchmarks/findings.py --train from {TRAIN_JSON_FILE} -->", "",
             f"Model `{data['model']}`, device {data['device']}, mode {data.get('mode')}; train data "
             f"{data['train_data']} ({data.get('n_train', '?')} problems × {data.get('epochs', '?')} epochs), "
             f"held-out {data['eval_data']} (n={data['n_eval']}, {metric} metric, greedy, "
             f"{data.get('eval_max_new_tokens', '?')} tokens); {data.get('prompts_per_step', '?')} prompts × "
             f"{data['num_generations']} completions × {data.get('max_completion_length', '?')} tokens per step, "
             f"LR {data['learning_rate']:g}, temperature {data.get('temperature', '?')}; "
             f"wall {data['wall_seconds'] / 60:.1f} min.", "",
             "| run | steps | held-out accuracy % before → after [Wilson 95 % after] | after − before, pts [bootstrap 95 %], "
             "McNemar p (gained / lost) | s/step (wall, with evaluations) |",
             "|---|---|---|---|---|"]
    for r in data["runs"]:
        evals = " → ".join(f"{e['accuracy']:.1f}" for e in r["evals"]) or "—"
        if r.get("eval_end"):
            evals += f" {_ci(r['eval_end']['wilson_ci'], '{:.1f}')}"
        learn = r.get("learning")
        lt = (f"{learn['difference']:+.1f} {_ci(learn['ci'], '{:+.1f}')}, p {_p(learn['mcnemar_p'])} "
              f"({learn['gained']} / {learn['lost']})") if learn else "—"
        st = f" (training step alone {r['step_time_mean']:.0f})" if r.get("step_time_mean") else ""
        lines.append(f"| {r['name']} | {r.get('steps', '?')} | {evals} | {lt} | {r['seconds_per_step']:.0f}{st} |")
    lines += ["", "Per step (TRL's log):", "", "| run | quantity | per step |", "|---|---|---|"]
    for r in data["runs"]:
        curves = r.get("curves") or {"reward": r.get("reward_curve") or []}
        for key, values in curves.items():
            if values:
                lines.append(f"| {r['name']} | {key} | {_curve_text(values)} |")
    for r in data["runs"]:
        if r.get("reward_by_epoch"):
            lines += ["", f"{r['name']}: mean reward per epoch (the same training problems each epoch): "
                      + " → ".join(f"{v:.3f}" for v in r["reward_by_epoch"]) + "."]
    for c in data.get("comparisons", []):
        lines += ["", f"{c['a']} vs {c['b']} at the end (paired on the held-out problems): difference "
                  f"{c['difference']:+.1f} pts {_ci(c['ci'], '{:+.1f}')}, McNemar p {_p(c['mcnemar_p'])}."]
    return "\n".join(lines) + "\n"


def render_train_plot(data: dict, out: Path) -> list[str]:
    """train.json's learning curve: reward per step (and a 3-step running mean) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = False
    for r in data["runs"]:
        rew = (r.get("curves") or {}).get("reward") or r.get("reward_curve") or []
        if not rew:
            continue
        steps = np.arange(1, len(rew) + 1)
        line, = ax.plot(steps, rew, "o", alpha=0.35, ms=3)
        k = min(3, len(rew))
        smooth = np.convolve(rew, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, "-", color=line.get_color(), label=f"{r['name']} (mean of {k})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return []
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward of the step's completions")
    ax.set_title(f"F5: reward per step ({data['device']}, {data.get('mode')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [_save(fig, out / "f5_reward.png")]


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

TRAIN_MODES = {
    # quick: the CPU pilot; full: sized for 10 minutes of one H200 (docs/findings.md, F5).
    # epoch-aware AQN restarts its schedule each epoch, so both modes run 2 epochs.
    "quick": {"prompts_per_step": 2, "group": 4, "steps_per_epoch": 6, "epochs": 2, "n_eval": 32,
              "eval_max_new_tokens": 48, "max_completion_length": 48, "temperature": 0.7},
    "full": {"prompts_per_step": 8, "group": 8, "steps_per_epoch": 20, "epochs": 2, "n_eval": 200,
             "eval_max_new_tokens": 64, "max_completion_length": 64, "temperature": 0.7},
}
TRAIN_DATA = "arith:level=1"
TRAIN_SHOTS = 2  # worked examples before every training and held-out question (as F3/F4's evaluation)
# The strict '#### N' reward: after a few-shot answer the model often goes on with a next "Question: ..."
# full of numbers, which the flexible metric (the LAST number) would score instead of the answer.
TRAIN_METRIC = "strict"
TRAIN_LR = 3e-5
TRAIN_NOISE = 0.05
TRAIN_RUNS = ("baseline", "noise-5%", "noise-5%+aqn-epoch-aware")
TRAIN_FILE = "train-problems.jsonl"
# per-step quantities kept from TRL's log (train.json): the learning signal and what limits it
TRAIN_CURVES = ("reward", "reward_std", "frac_reward_zero_std", "completions/clipped_ratio",
                "completions/mean_length", "entropy", "loss", "grad_norm", "step_time")
TRAIN_EVAL_FILE = "heldout-problems.jsonl"


def write_train_problems(out: Path, spec: str, n_train: int, n_eval: int, shots: int) -> dict:
    """GSM8K-format problem files whose questions carry ``shots`` worked examples, so that hwnoise.rl's
    prompts are few-shot with no library change. The examples are the first ``shots`` problems of the
    train stream; training takes the train stream's next ``n_train`` problems, the held-out file the
    test stream's first ``n_eval`` whose question is none of those."""
    from hwnoise.data import load_problems

    stream = load_problems(spec, n=shots + n_train, split="train")
    examples, train = stream[:shots], stream[shots:]
    seen = {p.question for p in stream}
    # A generator of small problems repeats some questions across its streams: those are dropped from
    # the held-out set (as hwnoise.rl does), so a larger draw of the test stream is taken.
    drawn = load_problems(spec, n=2 * n_eval + 16, split="test")
    held = [p for p in drawn if p.question not in seen][:n_eval]
    if len(held) < n_eval:
        raise ValueError(f"{spec!r}: only {len(held)} of the test stream's first {len(drawn)} questions are not "
                         f"also in the train stream's first {len(stream)}; n_eval is {n_eval}")
    prefix = "".join(f"Question: {e.question}\nAnswer: {_strip_calculator(e.answer)}\n\n" for e in examples)
    lead = "Question: " if shots else ""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, problems in ((TRAIN_FILE, train), (TRAIN_EVAL_FILE, held)):
        rows = [json.dumps({"question": prefix + lead + p.question, "answer": p.answer, "source_id": p.id})
                for p in problems]
        (out / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths[name] = str(out / name)
    return {"train": paths[TRAIN_FILE], "eval": paths[TRAIN_EVAL_FILE], "shots": shots,
            "example_ids": [e.id for e in examples], "train_ids": [p.id for p in train],
            "eval_ids": [p.id for p in held], "eval_dropped_as_seen": len([p for p in drawn[:drawn.index(held[-1]) + 1]
                                                                           if p.question in seen])}


def train_noise_emulation() -> dict:
    """The ``emulation`` section of the noisy runs: TRAIN_NOISE relative noise on every linear/matmul/bmm,
    in rollout and in training (forward and backward). One spec per phase where TrainConfig has that
    form; the earlier field-by-field keys (the same emulation) otherwise."""
    import dataclasses

    from hwnoise.rl.config import EmulationConfig

    spec = f"relative:{TRAIN_NOISE:g}@ops"
    if "rollout" in {f.name for f in dataclasses.fields(EmulationConfig)}:
        return {"rollout": spec, "training": spec}
    return {"noise": "relative", "noise_scale": TRAIN_NOISE, "noise_phase": "both"}


def train_configs(args, out: Path) -> list:
    """The F5 triple as TrainConfigs (validated before anything loads)."""
    from hwnoise.rl import TrainConfig

    m = dict(TRAIN_MODES[args.mode])
    if args.train_steps:  # steps per run: keep 2 epochs
        m["steps_per_epoch"] = max(1, args.train_steps // m["epochs"])
    steps = m["steps_per_epoch"] * m["epochs"]
    files = write_train_problems(out / "train" / "problems", TRAIN_DATA, m["steps_per_epoch"] * m["prompts_per_step"],
                                 m["n_eval"], TRAIN_SHOTS)
    lr = args.train_lr or TRAIN_LR
    base = {
        "model": args.model, "seed": 0, "device": args.device, "threads": args.threads, "epochs": m["epochs"],
        "data": {"train": files["train"], "n_train": m["steps_per_epoch"] * m["prompts_per_step"],
                 "eval": files["eval"], "n_eval": m["n_eval"]},
        "algorithm": {"num_generations": m["group"], "batch_size": m["group"] * m["prompts_per_step"],
                      "max_completion_length": m["max_completion_length"], "learning_rate": lr,
                      "temperature": m["temperature"],
                      "loss_type": "dapo", "gradient_checkpointing": False},
        "reward": {"mode": TRAIN_METRIC, "format_bonus": 0.1},
        "eval": {"at_start": True, "every": steps if args.mode == "quick" else max(1, steps // 2),
                 "max_new_tokens": m["eval_max_new_tokens"],
                 "batch_size": 64 if args.device == "cuda" else 8},
        "logging": {"report_to": ["none"], "save_steps": 0},
    }
    noise = train_noise_emulation()
    extras = {
        "baseline": {},
        "noise-5%": {"emulation": noise},
        "noise-5%+aqn-epoch-aware": {"emulation": noise, "aqn": {"enabled": True, "schedule": "epoch_aware",
                                                                 "sigma_start": 1e-2, "sigma_end": 5e-4,
                                                                 "stages": 3}},
    }
    configs = []
    for name in args.train_runs:
        d = json.loads(json.dumps(base))
        for k, v in extras[name].items():
            d.setdefault(k, {}).update(v)
        d["run_dir"] = str(out / "train" / name)
        configs.append((name, TrainConfig.from_dict(d).validate()))
    return configs


def run_train(args, out: Path, log) -> dict:
    from hwnoise.eval.stats import compare, wilson_interval
    from hwnoise.rl import train
    from hwnoise.rl.callbacks import read_evals

    configs = train_configs(args, out)
    t0 = time.perf_counter()
    runs, finals = [], {}
    for name, config in configs:
        log(f"F5: training {name} ({config.epochs} epochs)")
        t = time.perf_counter()
        run_dir = Path(config.run_dir)
        reused = (run_dir / "run.json").is_file() and json.loads((run_dir / "run.json").read_text()).get("status") == "finished"
        if not reused:
            train(config)
        seconds = time.perf_counter() - t
        evals = read_evals(run_dir)
        state = json.loads((run_dir / "run.json").read_text())
        curve = _reward_curve(state)
        if reused:  # the wall time of the training that made it (TRL's train_runtime: steps and evaluations)
            seconds = next((float(h["train_runtime"]) for h in state.get("log_history", []) if "train_runtime" in h),
                           float("nan"))
        per_epoch = max(1, len(curve) // config.epochs)
        step_times = _log_curve(state, "step_time")

        def summary(ev):
            rep = ev["report"]
            s = rep["settings"][0]
            return {"step": ev["step"], "accuracy": s["accuracy"][TRAIN_METRIC], "n": s["n"],
                    "wilson_ci": s["wilson_ci"][TRAIN_METRIC]}

        steps = state.get("steps") or 1
        runs.append({"name": name, "config": config.to_dict(), "evals": [summary(e) for e in evals],
                     "eval_start": summary(evals[0]) if evals else None,
                     "eval_end": summary(evals[-1]) if evals else None, "reward_curve": curve,
                     "learning": _learning(run_dir, evals), "steps": steps,
                     "reward_by_epoch": [float(np.mean(curve[i:i + per_epoch])) for i in range(0, len(curve), per_epoch)],
                     "step_time_mean": float(np.mean(step_times)) if step_times else None,
                     "curves": {k: _log_curve(state, k) for k in TRAIN_CURVES},
                     "seconds": seconds, "seconds_per_step": seconds / max(1, steps)})
        finals[name] = _final_correct(run_dir, evals)
    comparisons = []
    names = [n for n, _ in configs]
    pairs = [(a, b) for a, b in ((TRAIN_RUNS[1], TRAIN_RUNS[0]), (TRAIN_RUNS[2], TRAIN_RUNS[1])) if a in names and b in names]
    for a, b in pairs:
        if finals.get(a) is not None and finals.get(b) is not None and len(finals[a]) == len(finals[b]):
            c = compare(a, finals[b], finals[a], metric=TRAIN_METRIC)
            comparisons.append({"a": a, "b": b, "difference": -c.drop, "ci": [-c.drop_ci[1], -c.drop_ci[0]],
                                "mcnemar_p": c.mcnemar_p})
    m = TRAIN_MODES[args.mode]
    a0 = configs[0][1].algorithm
    return {"schema_version": SCHEMA_VERSION, "model": str(args.model), "device": args.device,
            "steps": runs[0]["evals"][-1]["step"] if runs and runs[0]["evals"] else None, "mode": args.mode,
            "train_data": f"{TRAIN_DATA} (train stream), {TRAIN_SHOTS} worked examples",
            "eval_data": f"{TRAIN_DATA} (test stream), the same examples", "n_eval": m["n_eval"],
            "n_train": configs[0][1].data.n_train, "epochs": configs[0][1].epochs, "metric": TRAIN_METRIC,
            "prompts_per_step": m["prompts_per_step"], "max_completion_length": a0.max_completion_length,
            "temperature": a0.temperature,
            "eval_max_new_tokens": m["eval_max_new_tokens"], "argv": sys.argv[1:],
            "num_generations": m["group"], "learning_rate": a0.learning_rate, "runs": runs, "comparisons": comparisons,
            # the runs' own wall times: a finished run that is reused counts with the time it took
            "wall_seconds": sum(r["seconds"] for r in runs), "assembly_seconds": time.perf_counter() - t0,
            "environment": environment(args), "claim": CLAIMS["F5"]}


def _reward_curve(state: dict) -> list[float]:
    """Mean reward per logged step, from the log history hwnoise.rl.train keeps in run.json."""
    return [float(h["reward"]) for h in state.get("log_history", []) if "reward" in h]


def _correct_at(run_dir: Path, step: int) -> list[bool]:
    """Per held-out problem (sorted by id: the same problems at every evaluation and in every run),
    correct at the evaluation of ``step``."""
    from hwnoise.eval.core import read_records
    from hwnoise.rl.callbacks import eval_dir

    records = read_records(eval_dir(run_dir, step) / "records.jsonl")
    return [records[k][f"correct_{TRAIN_METRIC}"] for k in sorted(k for k in records if k[0] == "clean")]


def _final_correct(run_dir: Path, evals) -> list[bool] | None:
    """Per held-out problem, correct at the last evaluation (None: no evaluation)."""
    return _correct_at(run_dir, evals[-1]["step"]) if evals else None


def _learning(run_dir: Path, evals) -> dict | None:
    """Held-out accuracy after training vs before (step 0), paired on the same problems."""
    from hwnoise.eval.stats import compare

    if len(evals) < 2 or evals[0]["step"] != 0:
        return None
    before, after = _correct_at(run_dir, 0), _correct_at(run_dir, evals[-1]["step"])
    c = compare("after", before, after, metric=TRAIN_METRIC)
    return {"before": 100.0 * float(np.mean(before)), "after": 100.0 * float(np.mean(after)), "n": len(before),
            "difference": -c.drop, "ci": [-c.drop_ci[1], -c.drop_ci[0]], "mcnemar_p": c.mcnemar_p,
            "gained": c.c, "lost": c.b}


def _log_curve(state: dict, key: str) -> list[float]:
    """One logged quantity per step (those steps that logged it), from run.json's log history."""
    return [float(h[key]) for h in state.get("log_history", []) if key in h]


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
