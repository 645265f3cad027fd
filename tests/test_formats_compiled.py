"""The compiled paths are the ones taken: quantize's kernels and the scan's statistics go through
formats.compiled.CompileCache, which falls back to eager on compiler errors only, and says so.

torch.compile is wrapped here to count calls of the compiled callable and to use dynamo's "eager"
backend (dynamo still captures the whole graph, fullgraph=True; inductor's codegen, whose bits
test_formats_rounding holds equal to eager, would only make these tests slow)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch._dynamo.exc
from torch._dynamo.utils import counters

import hwnoise as hn
from hwnoise.formats import compiled, fake_quant
from hwnoise.scan import measures

N = compiled.COMPILE_MIN_NUMEL


@pytest.fixture
def counting_compile(monkeypatch):
    """torch.compile with the eager backend; returns the list of calls made to compiled callables."""
    calls: list[str] = []
    real = torch.compile

    def fake_compile(fn, **kwargs):
        inner = real(fn, **{**kwargs, "backend": "eager"})

        def run(*args):
            calls.append(fn.__name__)
            return inner(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setenv("HWNOISE_COMPILE", "1")
    measures._CACHE.clear()
    fake_quant._CACHE.clear()
    counters.clear()
    yield calls
    measures._CACHE.clear()
    fake_quant._CACHE.clear()


def _options(x, fmt):
    return fake_quant._options(x, fmt, None, None, None, None, None)


def test_scan_statistics_run_compiled(counting_compile):
    # The scan read fake_quant.RECOMPILE_LIMIT (removed) inside a broad `except Exception`, so every
    # call fell back to eager and no test noticed.
    x = torch.randn(N // 256, 256)
    o = _options(x, "mxfp4")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        y = hn.quantize(x, "mxfp4")
        counting_compile.clear()
        stats = measures.tensor_stats(x, y, o)
    assert counting_compile, "the compiled statistics were never called"
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the graph: it was not skipped
    assert o in measures._CACHE.keys() and not measures._CACHE.eager_keys
    eager = measures._stats_body(o)(x, y).tolist()
    assert stats["nonzero"] == int(eager[3]) and stats["deadzone"] == int(eager[4])
    assert math.isclose(stats["signal"], eager[0], rel_tol=1e-6) and math.isclose(stats["noise"], eager[1], rel_tol=1e-6)
    # A second call reuses the compiled function: no new graph.
    graphs = counters["stats"]["unique_graphs"]
    measures.tensor_stats(x, y, o)
    assert counters["stats"]["unique_graphs"] == graphs and len(counting_compile) == 2


def test_quantize_runs_compiled(counting_compile):
    x = torch.randn(N // 256, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = hn.quantize(x, "mxfp4")
    assert counting_compile and counters["stats"]["unique_graphs"] >= 1
    assert not fake_quant._CACHE.eager_keys
    assert torch.equal(y, fake_quant.fake_quantize(x, _options(x, "mxfp4"), None))


def test_small_tensors_and_hwnoise_compile_0_stay_eager(counting_compile, monkeypatch):
    hn.quantize(torch.randn(N // 256 - 1, 256), "mxfp4")
    monkeypatch.setenv("HWNOISE_COMPILE", "0")
    hn.quantize(torch.randn(N // 256, 256), "mxfp4")
    assert counting_compile == [] and fake_quant._CACHE.keys() == []


def test_compiler_error_falls_back_to_eager_for_that_key_only_with_a_warning():
    cache = compiled.CompileCache("test")

    def broken(*_):
        raise torch._dynamo.exc.Unsupported("no graph for you")

    calls = []

    def body(x):
        calls.append("eager")
        return x + 1

    real = torch.compile
    try:
        torch.compile = lambda fn, **kw: broken
        with pytest.warns(RuntimeWarning, match=r"torch.compile failed for test \(Unsupported.*runs eager"):
            assert cache.run("a", body, torch.zeros(2)).tolist() == [1.0, 1.0]
        assert cache.eager_keys == {"a"}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cache.run("a", body, torch.zeros(2)).tolist() == [1.0, 1.0]  # warned once, stays eager
    finally:
        torch.compile = real
    assert calls == ["eager", "eager"]


def test_other_errors_are_not_swallowed():
    # Only compiler errors fall back; a bug in the body (or bad input) must surface.
    cache = compiled.CompileCache("test")
    real = torch.compile

    def raising(fn, **kw):
        def run(*_):
            raise ValueError("a real error")
        return run

    try:
        torch.compile = raising
        with pytest.raises(ValueError, match="a real error"):
            cache.run("a", lambda x: x, torch.zeros(2))
    finally:
        torch.compile = real
    assert not cache.eager_keys


def test_each_key_gets_its_own_code_object():
    # Dynamo caches by code object: sharing one across option sets walks every set's guards.
    body = lambda x: x  # noqa: E731
    a, b = compiled.own_code(body, 1), compiled.own_code(body, 2)
    assert a.__code__ is not b.__code__ and a(3) == b(3) == 3


def test_one_caches_compiler_failure_leaves_another_cache_compiling():
    # The fallback is per CompileCache and key: no process-wide "compile broken" switch.
    broken_cache, other = compiled.CompileCache("broken"), compiled.CompileCache("other")
    real = torch.compile
    compiled_calls = []

    def fake_compile(fn, **kw):
        def run(*args):
            if fn.__name__.startswith("fails"):
                raise torch._dynamo.exc.Unsupported("no graph for you")
            compiled_calls.append(fn.__name__)
            return fn(*args)
        return run

    def fails(x):
        return x + 1

    def works(x):
        return x + 2

    try:
        torch.compile = fake_compile
        with pytest.warns(RuntimeWarning, match="torch.compile failed for broken"):
            broken_cache.run("k", fails, torch.zeros(2))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: no second warning, in this cache or the other
            broken_cache.run("k", fails, torch.zeros(2))
            assert other.run("k", works, torch.zeros(2)).tolist() == [2.0, 2.0]
    finally:
        torch.compile = real
    assert broken_cache.eager_keys == {"k"} and not other.eager_keys
    assert compiled_calls and compiled_calls[0].startswith("works")  # the other cache ran its compiled function
