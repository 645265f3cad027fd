"""Noise from environment variables: parsing, errors, autoload, and replay across spawned processes."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

import hwnoise as hn
from hwnoise.errors import RelativeGaussian, Truncation
from hwnoise.inject.env import config_from_env, disable_from_env, enable_from_env

ENV = {"HWNOISE_OPS": "linear,matmul,bmm", "HWNOISE_ERROR": "relative", "HWNOISE_SCALE": "0.05",
       "HWNOISE_SEED": "7"}
SRC = os.path.join(os.path.dirname(__file__), "..", "src")
TESTS = os.path.dirname(__file__)


def test_config_from_env():
    assert config_from_env({}) is None
    cfg = config_from_env(ENV)
    assert cfg["error"] == RelativeGaussian(0.05) and cfg["ops"] == ("linear", "matmul", "bmm")
    assert cfg["seed"] == 7 and cfg["phase"] == "both" and cfg["forward"] and cfg["backward"]
    assert config_from_env({"HWNOISE_ERROR": "truncation", "HWNOISE_SCALE": "7", "HWNOISE_OPS": "all"})["error"] \
        == Truncation(mbits=7)
    cfg = config_from_env({"HWNOISE_ERROR": "relative:0.1", "HWNOISE_PHASE": "rollout", "HWNOISE_BACKWARD": "0"})
    assert cfg["error"] == RelativeGaussian(0.1) and cfg["phase"] == "rollout" and cfg["backward"] is False
    assert config_from_env({"HWNOISE_OPS": "all", "HWNOISE_ERROR": "bias:0.01"})["ops"] == "all"


@pytest.mark.parametrize(("env", "message"), [
    ({"HWNOISE_ERROR": "gaussian", "HWNOISE_SCALE": "0.1"}, r"HWNOISE_ERROR='gaussian' is not valid.*relative, absolute"),
    ({"HWNOISE_ERROR": "relative"}, r"HWNOISE_ERROR='relative' is not valid.*needs a scale"),
    ({"HWNOISE_ERROR": "relative", "HWNOISE_SCALE": "abc"}, r"HWNOISE_SCALE='abc' is not valid; accepted: a number"),
    ({"HWNOISE_ERROR": "relative", "HWNOISE_SCALE": "-0.1"}, r"HWNOISE_ERROR.*scale must be finite and >= 0"),
    ({"HWNOISE_ERROR": "relative:0.1", "HWNOISE_OPS": "linear,conv"}, r"HWNOISE_OPS='linear,conv'.*'all' or"),
    ({"HWNOISE_ERROR": "relative:0.1", "HWNOISE_OPS": ","}, r"HWNOISE_OPS"),
    ({"HWNOISE_ERROR": "relative:0.1", "HWNOISE_SEED": "1.5"}, r"HWNOISE_SEED='1.5' is not valid; accepted: an integer"),
    ({"HWNOISE_ERROR": "relative:0.1", "HWNOISE_PHASE": "eval"}, r"HWNOISE_PHASE='eval'.*both, rollout, training|rollout, training, both"),
    ({"HWNOISE_ERROR": "relative:0.1", "HWNOISE_BACKWARD": "maybe"}, r"HWNOISE_BACKWARD='maybe'.*1/0"),
    ({"HWNOISE_OPS": "linear", "HWNOISE_SCALE": "0.1"}, r"HWNOISE_ERROR is not"),
])
def test_malformed_environment_refuses(env, message):
    with pytest.raises(ValueError, match=message):
        config_from_env(env)


def test_enable_and_disable_in_process(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    clean = x @ w
    try:
        mode = hn.noisy_ops.enable_from_env()
        assert mode is not None and hn.noisy_ops.enable_from_env() is mode  # read once
        assert not torch.equal(x @ w, clean)
    finally:
        disable_from_env()
    assert torch.equal(x @ w, clean) and torch.overrides._get_current_function_mode_stack() == []


def test_autoload_refuses_bad_values_at_import():
    env = dict(os.environ, PYTHONPATH=SRC, HWNOISE_ERROR="relative", HWNOISE_SCALE="lots")
    proc = subprocess.run([sys.executable, "-c", "import hwnoise.autoload"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "HWNOISE_SCALE='lots' is not valid" in proc.stderr


def _worker(queue):
    # Runs in a spawned process: noise comes only from the inherited environment.
    import hwnoise.autoload  # noqa: F401  (enters noisy_ops from HWNOISE_*)
    import hwnoise
    from test_inject_models import tiny_llama, tokens

    model = tiny_llama()
    loss = model(input_ids=tokens(), labels=tokens()).loss
    loss.backward()
    buffer = io.BytesIO()  # bytes, not shared-memory tensors: the worker exits right after
    torch.save((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, hwnoise.autoload.MODE.stats()), buffer)
    queue.put(buffer.getvalue())


def test_two_spawned_processes_draw_the_same_bits(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.abspath(SRC), os.path.abspath(TESTS)]))
    ctx = mp.get_context("spawn")
    results = []
    for _ in range(2):
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(queue,))
        proc.start()
        results.append(torch.load(io.BytesIO(queue.get(timeout=300))))
        proc.join(timeout=60)
        assert proc.exitcode == 0
    (l1, g1, s1), (l2, g2, s2) = results
    assert s1 == s2 and s1["linear"] > 0
    assert torch.equal(l1, l2) and all(torch.equal(g1[n], g2[n]) for n in g1)
    # ... and the same bits as this process, with the same configuration in a block.
    from test_inject_models import tiny_llama, tokens

    model = tiny_llama()
    with hn.noisy_ops(RelativeGaussian(0.05), seed=7):
        loss = model(input_ids=tokens(), labels=tokens()).loss
        loss.backward()
    assert torch.equal(loss.detach(), l1)
    assert all(torch.equal(p.grad, g1[n]) for n, p in model.named_parameters())
    clean = tiny_llama()(input_ids=tokens(), labels=tokens()).loss
    assert not torch.equal(clean.detach(), l1)
