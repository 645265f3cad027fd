"""The four error metrics of one tensor and its quantized copy, in one pass over memory.

Same definitions as ``hwnoise.metrics`` (sqnr_db, deadzone_ratio, relative_error, and
saturation_ratio with a format: the share of entries beyond their block's largest magnitude),
computed together: elementwise in fp32, summed in fp32 along rows and in fp64 across rows. Large tensors go through one
compiled graph per format option set (``HWNOISE_COMPILE=0`` keeps it eager), which is what makes
a 211-module scan take seconds rather than a minute.
"""

from __future__ import annotations

import math

import torch

from ..formats import fake_quant
from ..formats.compiled import CompileCache, worth_compiling

__all__ = ["tensor_stats", "stats_to_metrics"]

# Raw sums, pooled over tensors for per-layer aggregates.
STAT_KEYS = ("signal", "noise", "relative_error_sum", "nonzero", "deadzone", "saturated", "numel")

# dynamic=True: a scan meets many weight shapes; one graph per option set serves them all.
_CACHE = CompileCache("scan statistics", dynamic=True)


def _stats_body(o: fake_quant.Options):
    def body(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.float()
        y = y.float()
        err = x - y
        nz = x != 0
        rel = torch.where(nz, err.abs() / torch.where(nz, x.abs(), torch.ones_like(x)), torch.zeros_like(x))
        # Without a format (an error model's noise) nothing saturates.
        sat = fake_quant.saturation_mask(x, o) if o is not None else torch.zeros_like(nz)

        def total(t):  # fp32 sums along rows, then fp64 across them: exact enough, one pass
            return t.float().sum(-1).double().sum() if t.dim() else t.double()

        return torch.stack([
            total(x * x),
            total(err * err),
            total(rel),
            total(nz),
            total(nz & (y == 0)),
            total(sat),
        ])
    return body


def tensor_stats(x: torch.Tensor, y: torch.Tensor, o: fake_quant.Options | None) -> dict[str, float]:
    """Raw sums for x and its quantized (or perturbed) copy y under resolved options ``o`` (see
    STAT_KEYS); ``o=None``: y is not on a format's grid (an error model), nothing counts as saturated."""
    body = _stats_body(o)
    x, y = x.detach(), y.detach()
    values = _CACHE.run(o, body, x, y) if o is not None and worth_compiling(x) else body(x, y)
    values = values.tolist()
    out = dict(zip(STAT_KEYS[:-1], values))
    for key in ("nonzero", "deadzone", "saturated"):
        out[key] = int(round(out[key]))
    out["numel"] = x.numel()
    return out


def stats_to_metrics(s: dict) -> dict[str, float]:
    """sqnr_db, deadzone_ratio, saturation_ratio, relative_error from (pooled) raw sums."""
    signal, noise = s["signal"], s["noise"]
    return {
        "sqnr_db": math.inf if noise == 0 else -math.inf if signal == 0 else 10.0 * math.log10(signal / noise),
        "deadzone_ratio": s["deadzone"] / s["nonzero"] if s["nonzero"] else 0.0,
        "saturation_ratio": s["saturated"] / s["numel"] if s["numel"] else 0.0,
        "relative_error": s["relative_error_sum"] / s["nonzero"] if s["nonzero"] else 0.0,
    }
