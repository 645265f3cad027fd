"""Keyed noise for injection sites: step counters and the two autograd pieces every tool shares.

A draw is keyed by (seed, site, role, step) through ``hwnoise.errors.noise_key``:

- site: the module's qualified name for module-level injection (``model.layers.3.mlp.down_proj``),
  the operator's name for operator-level noise (``linear``, ``matmul``, ``bmm``, ``softmax``...);
- role: "forward" for the result, "grad_input" / "grad_weight" for the two backward GEMMs;
- step: how many times that site was noised before in the current scope (the ``with`` block, or
  the life of an ``inject`` handle), so successive calls differ and a replay of the same program
  in a fresh scope draws the same noise. The backward of a call reuses the step of its forward.
"""

from __future__ import annotations

import threading
from collections import Counter

import torch

from ..errors import ROLES, ErrorModel, noise_key

__all__ = ["ROLES", "StepCounter", "noise_key", "perturb", "perturb_grad"]


class StepCounter:
    """Per-site call counters of one scope: ``next(site)`` returns 0, 1, 2, ... for each site."""

    def __init__(self):
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def next(self, site: str) -> int:
        with self._lock:
            step = self._counts[site]
            self._counts[site] = step + 1
        return step

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


class _Perturb(torch.autograd.Function):
    """Forward: ``error.apply(x, key)``; backward: the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x, error, key):
        return error.apply(x, key)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _PerturbGrad(torch.autograd.Function):
    """Forward: identity; backward: the incoming gradient gets ``error.apply(grad, key)``."""

    @staticmethod
    def forward(ctx, x, error, key):
        ctx.error, ctx.key = error, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.error.apply(grad, ctx.key), None, None


def perturb(x: torch.Tensor, error: ErrorModel, key: int) -> torch.Tensor:
    """``error.apply(x, key)`` with a straight-through gradient (plain call when no grad is needed)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Perturb.apply(x, error, key)
    return error.apply(x, key)


def perturb_grad(x: torch.Tensor, error: ErrorModel, key: int) -> torch.Tensor:
    """``x`` unchanged, but the gradient flowing back into it is perturbed with ``key``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _PerturbGrad.apply(x, error, key)
    return x
