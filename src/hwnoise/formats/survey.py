"""Survey formats on a model's linear weights: one row of error metrics per format."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .. import metrics
from ..progress import ProgressCallback, progress_reporter
from .fake_quant import quantize
from .registry import get

DEFAULT_SURVEY = ("mxfp4", "nvfp4", "hif4", "mxfp6_e2m3", "mxfp8_e4m3", "fp8_e4m3", "bf16")


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Qualified name -> weight of every nn.Linear (tied weights once per module name)."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def survey_formats(
    weights: dict[str, torch.Tensor],
    formats: Iterable[str] = DEFAULT_SURVEY,
    on_progress: ProgressCallback | None = None,
) -> dict:
    """Quantize every weight with every format. Per format: SQNR over all weights together, the
    mean and minimum of per-layer SQNR, MSE, mean relative error, deadzone and saturation ratios
    (element-weighted over all weights), bits per value, and the per-layer rows.

    on_progress(label, done, total) is called after each weight: label "<format> <weight name>",
    done of total weights of that format."""
    if not weights:
        raise ValueError("no weights to survey: the model has no nn.Linear modules")
    specs = [get(f) for f in formats]  # fail on a bad name before any work
    report = progress_reporter(on_progress, what="survey_formats")
    out = {}
    for fmt in specs:
        layers, signal, noise, count = {}, 0.0, 0.0, 0
        sums = {"mse": 0.0, "relative_error": 0.0, "deadzone_ratio": 0.0, "saturation_ratio": 0.0}
        for done, (name, w) in enumerate(weights.items(), 1):
            x = w.detach().float()
            y = quantize(x, fmt)
            row = metrics.error_summary(x, y)
            signal += row.pop("signal")
            noise += row.pop("noise")
            row["saturation_ratio"] = metrics.saturation_ratio(x, y, fmt)
            row["numel"] = x.numel()
            layers[name] = row
            count += x.numel()
            for k in sums:
                sums[k] += row[k] * x.numel()
            report(fmt.name, name, done, len(weights))
        finite = [r["sqnr_db"] for r in layers.values() if math.isfinite(r["sqnr_db"])]
        out[fmt.name] = {
            "bits_per_value": fmt.bits_per_value,
            "sqnr_db_total": 10 * math.log10(signal / noise) if noise > 0 else math.inf,
            "sqnr_db_mean": sum(finite) / len(finite) if finite else math.inf,
            "sqnr_db_min": min(finite) if finite else math.inf,
            **{k: v / count for k, v in sums.items()},
            "layers": layers,
        }
    return out
