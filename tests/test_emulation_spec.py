"""An Emulation's spec is its complete identity and round-trips (issue 13).

Before: ``Emulation.spec`` left out ops, targets and exclude, so ``Emulation(error="relative:0.05",
ops=("linear",))`` and the default-ops one shared the spec ``relative:0.05@ops``; evaluation
de-duplicates settings and keys records and run.json by the spec, so a resumed evaluation could
reuse another setting's records.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

import hwnoise as hn
from hwnoise import Emulation
from hwnoise.eval.core import parse_settings as eval_settings
from hwnoise.inject.ops import ALL_OPS, DEFAULT_OPS

FORMATS = sorted(hn.formats.names())[:6]
ERRORS = ["relative:0.05", "absolute:1e-3", "bias:0.01", "truncation:mbits=7", "quantize:mxfp4",
          "quantize:nvfp4,rounding=stochastic"]
TARGETS = ["linear", "rmsnorm", "layers.1-2", "*.q_proj", "mlp", "layers.[0-3].*"]
EXCLUDES = ["lm_head", "*.down_proj", "mlp", "layers.0.*"]

def _selects_modules(kw) -> bool:
    """Targets and exclude select the modules of formats and module-level errors; anywhere else
    they would do nothing and are refused (tests/test_emulation_resolved.py), so they stay default."""
    return bool(kw["weight_format"] or kw["input_format"] or (kw["error"] and kw["where"] != "ops"))


emulations = st.fixed_dictionaries(dict(
    weight_format=st.none() | st.sampled_from(FORMATS),
    input_format=st.none() | st.sampled_from(FORMATS),
    error=st.none() | st.sampled_from(ERRORS),
    where=st.sampled_from(("ops", "input", "output", "weight")),
    ops=st.lists(st.sampled_from(ALL_OPS), min_size=1, max_size=len(ALL_OPS)).map(tuple) | st.just("all"),
    aqn_sigma=st.just(0.0) | st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False),
    targets=st.sampled_from(TARGETS) | st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3).map(tuple),
    exclude=st.lists(st.sampled_from(EXCLUDES), max_size=3).map(tuple),
)).map(lambda kw: Emulation(**(kw if _selects_modules(kw) else {**kw, "targets": "linear", "exclude": ()})))


@settings(max_examples=300, deadline=None)
@given(emulations)
def test_emulation_spec_round_trips(e):
    assert Emulation.parse(e.spec) == e
    assert str(e) == e.spec
    assert Emulation.parse(e.spec).spec == e.spec
    assert Emulation.from_dict(e.to_dict()) == e


def test_emulation_spec_tells_apart_settings_that_differ_in_ops_targets_or_exclude():
    default_ops = Emulation(error="relative:0.05")
    linear_only = Emulation(error="relative:0.05", ops=("linear",))
    assert default_ops.spec == "relative:0.05@ops" and linear_only.spec == "relative:0.05@ops[linear]"
    assert linear_only.spec != default_ops.spec
    weights = Emulation(weight_format="mxfp4")
    for other in (Emulation(weight_format="mxfp4", targets="layers.1-2"),
                  Emulation(weight_format="mxfp4", exclude=("*.down_proj",)),
                  Emulation(error="absolute:1e-3", where="output", targets=("linear", "rmsnorm"))):
        assert other.spec != weights.spec and Emulation.parse(other.spec) == other
    # evaluation keeps both settings instead of collapsing them into one
    specs = [e.spec for e in eval_settings([default_ops, linear_only, weights, "weights:mxfp4+targets:layers.1-2"])]
    assert specs == ["clean", "relative:0.05@ops", "relative:0.05@ops[linear]", "weights:mxfp4",
                     "weights:mxfp4+targets:layers.1-2"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("clean", Emulation()),
    ("weights:nvfp4+aqn:0.01", Emulation(weight_format="nvfp4", aqn_sigma=0.01)),
    ("relative:0.05@ops", Emulation(error="relative:0.05")),
    ("relative:0.05", Emulation(error="relative:0.05")),
    ("absolute:1e-3@input", Emulation(error="absolute:1e-3", where="input")),
    ("W:mxfp4+a:mxfp8", None),
    ("relative:0.05@ops[all]", Emulation(error="relative:0.05", ops="all")),
    ("relative:0.05@ops[matmul, linear]", Emulation(error="relative:0.05", ops=("linear", "matmul"))),
    ("absolute:1e-3@output+targets:layers.14-17+exclude:*.down_proj,lm_head",
     Emulation(error="absolute:1e-3", where="output", targets="layers.14-17", exclude=("*.down_proj", "lm_head"))),
])
def test_existing_and_extended_spec_strings_parse(spec, expected):
    e = Emulation.parse(spec)
    if expected is not None:
        assert e == expected
    assert Emulation.parse(e.spec) == e
    if spec in ("clean", "weights:nvfp4+aqn:0.01", "relative:0.05@ops", "absolute:1e-3@input"):
        assert e.spec == spec  # spec strings already in use keep their canonical form


def test_fields_that_change_nothing_do_not_change_the_identity():
    # Ops mean nothing at module level; order of ops is not behaviour. (Operator noise selects no
    # modules: targets there would do nothing, and are refused rather than dropped.)
    with pytest.raises(ValueError, match="selects nothing"):
        Emulation(error="relative:0.05", targets="layers.1")
    assert Emulation(error="absolute:1e-3", where="output", ops=("linear",)).ops == DEFAULT_OPS
    assert Emulation(error="relative:0.05", ops=("bmm", "linear")) == Emulation(error="relative:0.05",
                                                                                ops=("linear", "bmm"))
    assert Emulation(weight_format="mxfp4", targets=("linear",)) == Emulation(weight_format="mxfp4")
    assert Emulation(where="input") == Emulation()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weight_format": "mxfp4", "targets": ("linear", "a+b")}, r"bad targets entry 'a\+b'.*separate"),
    ({"weight_format": "mxfp4", "exclude": ("x,y",)}, r"bad exclude entry 'x,y'"),
    ({"weight_format": "mxfp4", "targets": ()}, r"targets is empty"),
    ({"weight_format": "mxfp4", "targets": ("linear", "")}, r"bad targets entry ''"),
])
def test_unrepresentable_targets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Emulation(**kwargs)


@pytest.mark.parametrize(("spec", "message"), [
    ("absolute:1e-3@output[linear]", r"an op list is for @ops only"),
    ("relative:0.05@ops[conv]", r"unknown op 'conv'"),
    ("relative:0.05@ops[linear", r"bad where 'ops\[linear'"),
    ("relative:0.05@gpu", r"unknown where 'gpu'"),
    ("weights:mxfp4+targets:", r"bad part 'targets:'"),
    ("weights:mxfp4+targets:a+targets:b", r"sets targets twice"),
])
def test_bad_extended_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        Emulation.parse(spec)
