"""Environment-activated noise is process-wide: every thread that computes sees it (issue 13).

Ray async actors and verl 0.9 workers run every method on an asyncio loop in another thread than
the one that imported ``hwnoise.autoload``; torch function modes are per thread, so noise entered
on the importing thread alone left those computing clean, silently.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwnoise as hn
from hwnoise.errors import RelativeGaussian
from hwnoise.inject import env as env_module
from hwnoise.inject.env import disable_from_env, enable_from_env

ENV = {"HWNOISE_ERROR": "relative:0.05", "HWNOISE_OPS": "linear,matmul,bmm", "HWNOISE_SEED": "3"}
SRC = os.path.dirname(os.path.dirname(hn.__file__))  # the hwnoise under test, for the subprocess

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
W = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
CLEAN = X @ W.T  # computed before any mode is on


def _is_noisy(y: torch.Tensor) -> bool:
    # RelativeGaussian(0.05): every element moves, by a few percent of its size at most
    return not torch.equal(y, CLEAN) and bool(((y - CLEAN).abs() <= 0.5 * CLEAN.abs() + 1e-6).all())


def _bare_linear():
    return F.linear(X, W)


def _module_then_linear():
    layer = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
        return layer(X), F.linear(X, W)


def _in_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=fn()))
    thread.start()
    thread.join(timeout=60)
    return out["result"]


class _Worker(threading.Thread):
    """A Thread subclass with its own run(): the mode must be on before run starts."""

    def run(self):
        self.result = _bare_linear()


@pytest.fixture
def env_noise(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    stack_before = torch.overrides._get_current_function_mode_stack()
    yield enable_from_env
    disable_from_env()
    assert torch.overrides._get_current_function_mode_stack() == stack_before


def test_env_noise_reaches_a_plain_thread(env_noise):
    mode = env_noise()
    assert _is_noisy(_bare_linear())  # the importing thread, as before
    assert _is_noisy(_in_thread(_bare_linear)), "a thread started after enable_from_env computed clean"
    worker = _Worker()
    worker.start()
    worker.join(timeout=60)
    assert _is_noisy(worker.result)
    assert mode.stats()["linear"] == 3  # one mode, one counter for the whole process


def test_env_noise_reaches_an_asyncio_loop_in_another_thread(env_noise):
    env_noise()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        async def method():  # how a Ray async actor runs a method
            await asyncio.sleep(0)
            return _module_then_linear()

        module_out, bare = asyncio.run_coroutine_threadsafe(method(), loop).result(timeout=60)
        assert _is_noisy(module_out) and _is_noisy(bare)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=60)
        loop.close()


def test_env_noise_reaches_a_thread_started_before_enable(env_noise):
    # A pool thread that already existed (or a thread made by a C++ pool): the first module call enters it.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        assert torch.equal(pool.submit(_bare_linear).result(timeout=60), CLEAN)  # thread now exists
        env_noise()
        module_out, bare = pool.submit(_module_then_linear).result(timeout=60)
        assert _is_noisy(module_out) and _is_noisy(bare)


def test_env_noise_sits_below_a_scoped_block_open_on_the_thread(env_noise):
    # A thread that opened its own noisy_ops block before its first module call: the environment's
    # mode goes under the block, which still exits cleanly on that thread.
    def run():
        with hn.noisy_ops(RelativeGaussian(0.05), ops=("matmul",), seed=9) as block:
            y, bare = _module_then_linear()
            inner_stack = torch.overrides._get_current_function_mode_stack()
        after = torch.overrides._get_current_function_mode_stack()
        return y, bare, block, inner_stack, after

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: None).result(timeout=60)
        mode = env_noise()
        y, bare, block, inner_stack, after = pool.submit(run).result(timeout=60)
    assert inner_stack == [mode, block] and after == [mode]
    assert _is_noisy(y) and _is_noisy(bare) and block.stats() == {}  # linear came from the environment


def test_scoped_noisy_ops_block_stays_on_its_thread():
    with hn.noisy_ops(RelativeGaussian(0.05)):
        assert _is_noisy(_bare_linear())
        assert torch.equal(_in_thread(_bare_linear), CLEAN)


def test_no_env_variables_leave_every_thread_clean(monkeypatch):
    for k in env_module.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    hooks = dict(torch.nn.modules.module._global_forward_pre_hooks)
    assert enable_from_env() is None
    assert threading.Thread._bootstrap_inner is env_module._ORIGINAL_BOOTSTRAP
    assert dict(torch.nn.modules.module._global_forward_pre_hooks) == hooks
    assert torch.equal(_bare_linear(), CLEAN) and torch.equal(_in_thread(_bare_linear), CLEAN)
    assert torch.equal(_in_thread(lambda: _module_then_linear()[0]), CLEAN)


def test_disable_from_env_switches_other_threads_off_too(env_noise):
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        env_noise()
        assert _is_noisy(pool.submit(_module_then_linear).result(timeout=60)[1])
        disable_from_env()
        assert torch.equal(pool.submit(_module_then_linear).result(timeout=60)[1], CLEAN)
        assert torch.equal(_in_thread(_bare_linear), CLEAN) and torch.equal(_bare_linear(), CLEAN)


_AUTOLOAD_ASYNC = """
import asyncio, threading, torch, torch.nn.functional as F
x, w = torch.randn(4, 16), torch.randn(8, 16)
clean = x @ w.T
import hwnoise.autoload
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
async def method():
    return F.linear(x, w)
y = asyncio.run_coroutine_threadsafe(method(), loop).result(timeout=60)
print("NOISY" if not torch.equal(y, clean) else "CLEAN", hwnoise.autoload.MODE.stats())
"""


def test_autoload_noise_reaches_an_asyncio_thread():
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", **ENV)
    proc = subprocess.run([sys.executable, "-c", _AUTOLOAD_ASYNC], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "NOISY {'linear': 1}" in proc.stdout, proc.stdout + proc.stderr
