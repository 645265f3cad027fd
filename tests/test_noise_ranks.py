"""Every process draws its own noise: draws differ by rank and replica, reproducibly (issue 23, 4).

Before: the draw key was (seed, site, role, step) with one HWNOISE_SEED for the whole job, so 8
FSDP ranks (and 8 vLLM replicas) drew identical noise on different data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import hwnoise as hn
from hwnoise.errors import RelativeGaussian

REL = RelativeGaussian(0.05)
X = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
W = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))


def _draw(**kw):
    with hn.noisy_ops(REL, seed=5, **kw):
        return F.linear(X, W)


@pytest.fixture
def no_rank_env(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "HWNOISE_REPLICA", "VERL_REPLICA_RANK"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_two_ranks_draw_differently_and_each_reproduces(no_rank_env):
    r0, r1 = _draw(rank=0), _draw(rank=1)
    assert not torch.equal(r0, r1)
    assert torch.equal(_draw(rank=0), r0) and torch.equal(_draw(rank=1), r1)


def test_rank_and_replica_from_the_environment(no_rank_env):
    single = _draw()
    no_rank_env.setenv("RANK", "0")
    assert torch.equal(_draw(), single)  # rank 0, no replica: the single-process draws
    no_rank_env.setenv("RANK", "1")
    rank1 = _draw()
    assert not torch.equal(rank1, single)
    no_rank_env.delenv("RANK")
    no_rank_env.setenv("LOCAL_RANK", "1")
    assert torch.equal(_draw(), rank1)
    no_rank_env.delenv("LOCAL_RANK")
    no_rank_env.setenv("VERL_REPLICA_RANK", "0")
    replica0 = _draw()
    no_rank_env.setenv("VERL_REPLICA_RANK", "1")
    replica1 = _draw()
    assert len({single.sum().item(), replica0.sum().item(), replica1.sum().item()}) == 3
    no_rank_env.setenv("VERL_REPLICA_RANK", "1")
    assert torch.equal(_draw(), replica1)


def test_a_single_process_keeps_its_seed(no_rank_env):
    """The too-far check: without a rank or replica the seed keys the draws unchanged."""
    from hwnoise.inject.keys import process_rank, process_seed, replica_index

    assert process_seed(5) == 5 and process_rank() == (0, False) and replica_index() is None
    assert process_seed(5, rank=0, replica=None) == 5
    seeds = {process_seed(5, rank=r, replica=p) for r in range(4) for p in (None, 0, 1)}
    assert len(seeds) == 12


def test_bad_rank_variable_is_named(no_rank_env):
    no_rank_env.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        _draw()


_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.nn.functional as F
    import hwnoise.autoload as auto  # the worker switch, from HWNOISE_* variables
    rank = int(sys.argv[1])
    # as a vLLM worker does: the rank reaches torch.distributed, not the environment
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    w = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    y = F.linear(x, w)
    torch.save(y, sys.argv[3])
    dist.destroy_process_group()
""")


def _two_ranks(tmp_path, tag):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "VERL_REPLICA_RANK")}
    env.update(HWNOISE_ERROR="relative:0.05", HWNOISE_SEED="5", OMP_NUM_THREADS="1")
    store = tmp_path / f"store-{tag}"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(store), str(tmp_path / f"{tag}-{r}.pt")],
                              env=env) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    return [torch.load(tmp_path / f"{tag}-{r}.pt") for r in range(2)]


def test_two_real_ranks_of_a_process_group(tmp_path):
    first, again = _two_ranks(tmp_path, "a"), _two_ranks(tmp_path, "b")
    assert not torch.equal(first[0], first[1])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    clean = F.linear(X, W)
    assert not torch.equal(first[0], clean)
