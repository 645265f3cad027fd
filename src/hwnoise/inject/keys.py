"""Keyed noise for injection sites: step counters and the two autograd pieces every tool shares.

A draw is keyed by (seed, site, role, step) through ``hwnoise.errors.noise_key``:

- site: the module's qualified name for module-level injection (``model.layers.3.mlp.down_proj``),
  the operator's name for operator-level noise (``linear``, ``matmul``, ``bmm``, ``softmax``...);
- role: "forward" for the result, "grad_input" / "grad_weight" for the two backward GEMMs;
- step: how many times that site was noised before in the current scope (the ``with`` block, or
  the life of an ``inject`` handle), so successive calls differ and a replay of the same program
  in a fresh scope draws the same noise. The backward of a call reuses the step of its forward.

Several processes (FSDP ranks, vLLM workers, rollout replicas) are several devices: each draws its
own noise. ``process_seed(seed)`` is the seed a process keys its draws with: ``seed`` itself in a
single process (rank 0, no replica), else a hash of (seed, rank, replica), so every rank and
replica draws differently and each reproduces its own draws from the seed. The rank is
``torch.distributed``'s once it is initialized (vLLM workers pass theirs there, not in the
environment), else ``RANK``, else ``LOCAL_RANK``; the replica ``HWNOISE_REPLICA`` or verl's
``VERL_REPLICA_RANK`` (set in each vLLM server actor and inherited by its worker processes).
AQN on a vLLM engine's norms keys by replica only (``process_seed(seed, rank=0)``): the norms are
replicated on the tensor-parallel ranks of one replica, which must hold the same weights.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter

import torch

from ..errors import ROLES, ErrorModel, noise_key

__all__ = ["ROLES", "StepCounter", "noise_key", "perturb", "perturb_grad", "process_rank", "process_seed",
           "replica_index"]

RANK_VARS = ("RANK", "LOCAL_RANK")
REPLICA_VARS = ("HWNOISE_REPLICA", "VERL_REPLICA_RANK")


def _int_var(names, environ) -> tuple[int | None, str | None]:
    for var in names:
        text = environ.get(var, "")
        if text.strip() != "":
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"{var}={text!r} is not a rank; expected an integer >= 0") from None
            if value < 0:
                raise ValueError(f"{var}={text!r} is not a rank; expected an integer >= 0")
            return value, var
    return None, None


def process_rank(environ=None) -> tuple[int, bool]:
    """(this process's rank, whether it is settled): ``torch.distributed``'s rank once initialized,
    else ``RANK``, else ``LOCAL_RANK``, else 0. Not settled: no source yet (it may still come)."""
    env = os.environ if environ is None else environ
    if environ is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank()), True
    rank, var = _int_var(RANK_VARS, env)
    return (rank, True) if rank is not None else (0, False)


def replica_index(environ=None) -> int | None:
    """The rollout replica this process serves (``HWNOISE_REPLICA`` or verl's ``VERL_REPLICA_RANK``), or None."""
    return _int_var(REPLICA_VARS, os.environ if environ is None else environ)[0]


def process_seed(seed: int, rank: int | None = None, replica: int | None = -1, environ=None) -> int:
    """The seed this process keys its draws with: ``seed`` for rank 0 without a replica, else a
    63-bit hash of (seed, rank, replica), so ranks and replicas draw independently and each is
    reproducible from ``seed``. ``rank``/``replica`` default to this process's (``process_rank``,
    ``replica_index``; ``replica=-1`` means "from the environment", None none).

    Example: ``process_seed(0, rank=1) != process_seed(0, rank=0) == 0``.
    """
    if rank is None:
        rank = process_rank(environ)[0]
    if replica == -1:
        replica = replica_index(environ)
    if rank == 0 and replica is None:
        return int(seed)
    digest = hashlib.blake2b(f"{seed}\x00rank\x00{rank}\x00replica\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


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
