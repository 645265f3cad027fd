"""Generation throughput of the evaluation under operator-level noise against plain ``model.generate``.

Three ways to generate the same batch of arith prompts with the bundled model, greedy, measured in
the same process and interleaved (plain, clean, noisy, plain, ...) so that a busy machine slows them
alike; the table gives the median of the repeats and the ratio to plain ``model.generate``:

- plain: ``tokenizer(..., padding=True)`` with left padding, then ``model.generate`` (the baseline);
- clean: ``hwnoise.eval.generate_greedy`` inside ``Emulation("clean").applied`` (what ``evaluate``
  runs for the clean setting: its own overhead alone);
- noisy: the same inside ``Emulation.parse("relative:0.05@ops").applied`` (every linear output
  perturbed by keyed Gaussian noise). Target: at least 0.8x plain.

Tokens per second count every computed position (rows x generated steps), so a row that stopped
early at EOS while the batch went on still counts: that is the work the machine did.

Run: python benchmarks/eval.py [--batch-size 8] [--max-new-tokens 64] [--repeats 3] [--setting relative:0.05@ops]
     [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from hwnoise.data import load_problems
from hwnoise.eval.generate import build_prompts, eos_token_ids, generate_greedy
from hwnoise.emulation import Emulation
from hwnoise.models import load

TARGET_RATIO = 0.8


def plain_generate(model, tokenizer, texts, max_new_tokens) -> int:
    """The baseline: HF's own left padding and ``model.generate``; returns computed positions."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])


def hwnoise_generate(model, tokenizer, prompts, max_new_tokens, emulation, step) -> int:
    """What ``evaluate`` runs per batch; returns computed positions (rows x the longest completion)."""
    with torch.no_grad(), emulation.applied(model, seed=0, step=step):
        completions = generate_greedy(model, tokenizer, prompts, max_new_tokens)
    return len(completions) * max(c.generated_tokens for c in completions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--setting", default="relative:0.05@ops", help="the noisy setting (an Emulation spec)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the timings here")
    args = ap.parse_args()
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=150)

    t0 = time.perf_counter()
    model, tokenizer = load("default")
    console.print(f"model loaded in {time.perf_counter() - t0:.1f} s; torch threads: {torch.get_num_threads()}")
    problems = load_problems("arith", n=args.batch_size)
    prompts = build_prompts(tokenizer, [p.question for p in problems])
    texts = [p.text for p in prompts]
    clean, noisy = Emulation(), Emulation.parse(args.setting)
    runs = {
        "plain model.generate": lambda step: plain_generate(model, tokenizer, texts, args.max_new_tokens),
        "evaluate, clean": lambda step: hwnoise_generate(model, tokenizer, prompts, args.max_new_tokens, clean, step),
        f"evaluate, {noisy.spec}": lambda step: hwnoise_generate(model, tokenizer, prompts, args.max_new_tokens,
                                                                 noisy, step),
    }
    for fn in runs.values():  # warm-up: first-call costs (allocator, lazy imports) out of the timings
        fn(0)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            tokens = fn(repeat)
            dt = time.perf_counter() - t
            rates[name].append(tokens / dt)
            seconds[name].append(dt)

    table = Table(title=f"Greedy generation, bundled model, batch {args.batch_size} x <= {args.max_new_tokens} new "
                        f"tokens; median of {args.repeats} interleaved repeats")
    for col in ("run", "tokens / s", "seconds / batch", "x plain", f">= {TARGET_RATIO}x"):
        table.add_column(col, justify="left" if col == "run" else "right")
    base = statistics.median(rates["plain model.generate"])
    summary = {}
    for name in runs:
        rate = statistics.median(rates[name])
        ratio = rate / base
        summary[name] = {"tokens_per_s": rate, "ratio": ratio, "rates": rates[name], "seconds": seconds[name]}
        table.add_row(name, f"{rate:.1f}", f"{statistics.median(seconds[name]):.2f}", f"{ratio:.2f}",
                      "-" if name.startswith("plain") else ("yes" if ratio >= TARGET_RATIO else "NO"))
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": summary}, f, indent=2)


if __name__ == "__main__":
    main()
