"""A scan resolves its format once: the registry's look-ups do not grow with the number of modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, tiny_llama  # noqa: E402

import hwnoise as hn  # noqa: E402
from hwnoise.formats import registry  # noqa: E402

TEXTS = ["the cat sat on the mat", "one two three four", "a b c d e f g"]


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")


def count_registry_calls(monkeypatch) -> dict[str, int]:
    """Count calls of the registry's parsing and resolving functions, wherever they are called from."""
    calls = {"get": 0, "parse_options": 0, "resolve_options": 0}
    import importlib

    fq, core, plan, report = (importlib.import_module(f"hwnoise.{m}") for m in
                              ("formats.fake_quant", "scan.core", "scan.plan", "scan.report"))

    def spy(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    get = spy("get", registry.get)
    for module in (registry, fq, core, plan, report):
        monkeypatch.setattr(module, "get", get, raising=False)
    monkeypatch.setattr(registry, "parse_options", spy("parse_options", registry.parse_options))
    monkeypatch.setattr(registry, "resolve_options", spy("resolve_options", registry.resolve_options))
    return calls


@pytest.mark.parametrize("where", ["weight", "input"])
@pytest.mark.parametrize("spec, options", [("mxfp4:rceil", {}), ("nvfp4", {"rounding": "stochastic", "seed": 3})])
def test_format_resolved_once_per_scan(monkeypatch, where, spec, options):
    tok = ByteTokenizer()
    counts = []
    for layers in (1, 4):
        calls = count_registry_calls(monkeypatch)
        report = hn.scan(tiny_llama(layers=layers), tok, texts=TEXTS, format=spec, where=where, **options)
        assert len(report.rows) == 7 * layers + 1  # 7 linears per decoder layer + lm_head: more modules
        counts.append(dict(calls))
        monkeypatch.undo()
        monkeypatch.setenv("HWNOISE_COMPILE", "0")
    assert counts[0] == counts[1], counts  # the same look-ups for 8 modules as for 29
    assert 1 <= counts[0]["get"] <= 3, counts


def test_resolved_format_quantizes_like_quantize():
    import torch

    from hwnoise.scan import resolve_format

    x = torch.randn(8, 64)
    r = resolve_format("mxfp4", {"rounding": "stochastic", "seed": 5, "block": 16})
    assert torch.equal(r.quantize(x), hn.quantize(x, "mxfp4", rounding="stochastic", seed=5, block=16))
    assert r.options(x) == hn.formats.fake_quant.options_for(x, "mxfp4", rounding="stochastic", block=16)
    with pytest.raises(ValueError, match="unknown scan option"):
        resolve_format("mxfp4", {"colour": "red"})
