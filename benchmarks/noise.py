"""Cost of noise injection: forward+backward of the bundled SmolLM2-135M (batch 4 x 128 tokens),
every setting measured in the same run and printed as a ratio to the clean step:

- clean          : no noise;
- module output  : `hn.inject(model, RelativeGaussian(s), where="output", targets="linear")`
                   (forward hooks on the 210 decoder linears; stats measured);
- ops linear     : `hn.noisy_ops(RelativeGaussian(s), ops=("linear",))`, forward and backward noise
                   (every F.linear incl. lm_head: result, grad_input and grad_weight perturbed);
- ops default    : ops=("linear", "matmul", "bmm") (adds attention/rotary matmuls where they exist);
- naive recipe   : what people do today: F.linear monkey-patched with an autograd.Function whose
                   forward and backward call `torch.randn_like` (forward noise + grad_input noise +
                   grad_weight noise, unkeyed), the reference cost of "just add noise".

Settings run interleaved, round after round, and each reports its fastest round, so that load
from other processes on a shared machine hits all of them alike. Target: ops linear <= 1.3x clean.

Run: python benchmarks/noise.py [--batch 4] [--tokens 128] [--rounds 3] [--threads N] [--json out.json]
On a shared machine use --threads 1: with other processes running, 2-thread OpenMP regions
oversubscribe and every setting slows 3-4x, hiding the differences being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import hwnoise as hn
from hwnoise.errors import RelativeGaussian

SCALE = 0.05


class NaiveNoisyLinear(torch.autograd.Function):
    """The common recipe: unkeyed randn_like noise on the result and on both backward GEMMs."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        y = _ORIGINAL_LINEAR(x, w, b)
        return y + torch.randn_like(y) * y.abs() * SCALE

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = grad @ w
        gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        gx = gx + torch.randn_like(gx) * gx.abs() * SCALE
        gw = gw + torch.randn_like(gw) * gw.abs() * SCALE
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return gx, gw, gb


_ORIGINAL_LINEAR = F.linear


def naive_linear(x, w, b=None):
    return NaiveNoisyLinear.apply(x, w, b)


class Setting:
    def __init__(self, name, enter):
        self.name, self.enter, self.samples = name, enter, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hwnoise.models import load

    model, _ = load("default")
    model.train()
    ids = torch.randint(0, 1000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    error = RelativeGaussian(SCALE)

    def patch_naive():
        # The global monkey-patch (restored after the step: the benchmark must not leak it).
        class Patch:
            def __enter__(self):
                F.linear = naive_linear
                torch.nn.modules.linear.F.linear = naive_linear

            def __exit__(self, *exc):
                F.linear = _ORIGINAL_LINEAR
                torch.nn.modules.linear.F.linear = _ORIGINAL_LINEAR

        return Patch()

    class Null:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    settings = [
        Setting("clean", Null),
        Setting("module output (210 linears)", lambda: hn.inject(model, error, where="output", targets="linear")),
        Setting("ops linear (fwd+bwd)", lambda: hn.noisy_ops(error, ops=("linear",))),
        Setting("ops linear,matmul,bmm (fwd+bwd)", lambda: hn.noisy_ops(error)),
        Setting("naive randn_like recipe (fwd+bwd)", patch_naive),
    ]

    def step(setting):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with setting.enter():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return time.perf_counter() - t0, float(loss.detach())

    losses = {}
    for setting in settings:  # warm-up round
        _, losses[setting.name] = step(setting)
    for _ in range(args.rounds):
        for setting in settings:
            setting.samples.append(step(setting)[0])

    clean = min(settings[0].samples)
    rows = []
    print(f"bundled SmolLM2-135M, fwd+bwd, batch {args.batch} x {args.tokens} tokens, RelativeGaussian({SCALE}), "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, best of {args.rounds} interleaved rounds")
    print(f"{'setting':38s} {'seconds':>8s} {'x clean':>8s} {'loss':>8s}")
    for setting in settings:
        best = min(setting.samples)
        rows.append({"setting": setting.name, "seconds": best, "ratio": best / clean, "loss": losses[setting.name],
                     "samples": setting.samples})
        print(f"{setting.name:38s} {best:8.3f} {best / clean:8.2f} {losses[setting.name]:8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "tokens": args.tokens, "threads": torch.get_num_threads(), "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
