"""Error metrics between a reference tensor x and its approximation x_hat (computed in float64)."""

from __future__ import annotations

import math

import torch

from .formats.fake_quant import options_for, saturated

FORMAT_OPTIONS = ("scale_mode", "rounding", "block", "axis", "flavor")


def _pair(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    return x.detach().to(torch.float64), x_hat.detach().to(torch.float64)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio: 10 log10(sum x^2 / sum (x - x_hat)^2), in dB.
    inf when x_hat equals x; -inf when x is all zero but x_hat is not."""
    x, x_hat = _pair(x, x_hat)
    signal = float((x * x).sum())
    noise = float(((x - x_hat) ** 2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error: mean((x - x_hat)^2)."""
    x, x_hat = _pair(x, x_hat)
    return float(((x - x_hat) ** 2).mean()) if x.numel() else 0.0


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean relative error over the nonzero entries of x: mean(|x - x_hat| / |x|) for x != 0."""
    x, x_hat = _pair(x, x_hat)
    nz = x != 0
    if not bool(nz.any()):
        return 0.0
    return float(((x - x_hat).abs()[nz] / x.abs()[nz]).mean())


def deadzone_ratio(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Share of the nonzero entries of x that x_hat flushes to zero: #(x != 0 and x_hat == 0) / #(x != 0)."""
    x, x_hat = _pair(x, x_hat)
    nz = x != 0
    n = int(nz.sum())
    return int((nz & (x_hat == 0)).sum()) / n if n else 0.0


def error_summary(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """sqnr_db, mse, relative_error and deadzone_ratio in one pass (same formulas as the single
    functions; elementwise in fp32, sums accumulated in fp64), plus the raw signal and noise
    energies for pooling over tensors. For large weight surveys."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    x, x_hat = x.detach().float(), x_hat.detach().float()
    err = x - x_hat
    signal = float(torch.sum(x * x, dtype=torch.float64))
    noise = float(torch.sum(err * err, dtype=torch.float64))
    nz = x != 0
    n_nz = int(nz.sum())
    rel = torch.where(nz, err.abs() / torch.where(nz, x.abs(), torch.ones_like(x)), torch.zeros_like(x))
    return {
        "sqnr_db": math.inf if noise == 0 else -math.inf if signal == 0 else 10.0 * math.log10(signal / noise),
        "mse": noise / x.numel() if x.numel() else 0.0,
        "relative_error": float(torch.sum(rel, dtype=torch.float64)) / n_nz if n_nz else 0.0,
        "deadzone_ratio": int((nz & (x_hat == 0)).sum()) / n_nz if n_nz else 0.0,
        "signal": signal,
        "noise": noise,
    }


def saturation_ratio(x: torch.Tensor, x_hat: torch.Tensor, format=None, **format_options) -> float:  # noqa: A002
    """Share of the entries of x that lie beyond the largest magnitude their block can represent
    (they were clipped). With a format, the block limits come from the format; without one,
    the ratio counts entries with |x| > max |x_hat| (clipped against the tensor's top value)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if x.numel() == 0:
        return 0.0
    unknown = sorted(set(format_options) - set(FORMAT_OPTIONS))
    if unknown:  # checked with or without a format: a misspelled keyword is never ignored
        raise TypeError(f"unknown format option(s) {', '.join(unknown)}; accepted: {', '.join(FORMAT_OPTIONS)}")
    if format is None:
        if format_options:
            raise TypeError(f"format options {', '.join(sorted(format_options))} need a format (format=...)")
        return int((x.detach().abs() > x_hat.detach().abs().max()).sum()) / x.numel()
    return int(saturated(x, options_for(x, format, **format_options)).sum()) / x.numel()
