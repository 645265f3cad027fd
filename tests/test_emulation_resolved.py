"""Issue 21: an Emulation is parsed once and holds its resolved parts; issue 20 items 6 (spec parts
that do nothing are refused), 12 (no '+' inside a canonical number), 13 (a plan directory,
relative:1e308@ops) and 14 (plan candidates with option lists, plan files that are not plans)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import hwnoise as hn
from hwnoise.emulation import Emulation, format_number
from hwnoise.errors import ErrorModel
from hwnoise.formats import registry
from hwnoise.formats.registry import FormatSpec
from hwnoise.plans import WeightPlan
from hwnoise.scan.plan import parse_candidates


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"a": "mxfp8_e4m3", "b": "mxfp4"}))
    return path


def test_emulation_holds_resolved_parts(plan_file):
    e = Emulation.parse("weights:mxfp4+inputs:nvfp4+absolute:1e-3@output")
    assert isinstance(e.weights, FormatSpec) and e.weights.name == "mxfp4"
    assert isinstance(e.inputs, FormatSpec) and e.inputs.name == "nvfp4"
    assert isinstance(e.error_model, ErrorModel) and e.scale == 1e-3
    p = Emulation.parse(f"weights:{plan_file}")
    assert isinstance(p.weights, WeightPlan) and p.weight_spec_for("a").name == "mxfp8_e4m3"
    assert Emulation.parse(e.spec) == e and str(p) == p.spec  # the spec stays the identity


def test_applied_never_parses_a_spec_again(plan_file, monkeypatch):
    model, x = Tiny(), torch.randn(4, 32)
    settings_ = [Emulation.parse(s) for s in ("weights:mxfp4", f"weights:{plan_file}", "inputs:mxfp4",
                                             "relative:0.05@output", "weights:nvfp4+relative:0.01@ops")]

    looked_up = []

    def no_lookup(spec, *a, **k):
        if isinstance(spec, FormatSpec):  # an already resolved format passes through get() as is
            return spec
        looked_up.append(spec)
        raise AssertionError(f"{spec!r} was parsed again after Emulation.parse")

    import hwnoise.emulation as emulation_module
    import hwnoise.formats as formats_package
    from hwnoise.formats import fake_quant

    for where in (registry, fake_quant, formats_package):
        monkeypatch.setattr(where, "get", no_lookup)
    monkeypatch.setattr(emulation_module, "get_format", no_lookup)
    monkeypatch.setattr(registry, "parse_options", no_lookup)
    monkeypatch.setattr(hn.errors, "parse", no_lookup)
    monkeypatch.setattr(WeightPlan, "load", no_lookup)
    clean = model(x)
    for e in settings_:
        with torch.no_grad(), e.applied(model, seed=1):
            assert not torch.equal(model(x), clean), e.spec
        assert torch.equal(model(x), clean)
    assert not looked_up
    with pytest.raises(AssertionError, match="parsed again"):  # the patch does catch a look-up
        hn.quantize(x, "mxfp4")


def test_a_plan_applies_each_module_in_its_format(plan_file):
    model = Tiny()
    wa, wb = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    with Emulation.parse(f"weights:{plan_file}").applied(model) as stats:
        assert torch.equal(model.a.weight, hn.quantize(wa, "mxfp8_e4m3"))
        assert torch.equal(model.b.weight, hn.quantize(wb, "mxfp4"))
        assert stats.weights_quantized == 2
    assert torch.equal(model.a.weight, wa)


def test_inputs_go_through_the_swap_and_match_inject():
    from hwnoise.emulation import _derived_seed

    model, x = Tiny(), torch.randn(4, 32)
    e = Emulation.parse("inputs:mxfp4:rounding=stochastic+targets:a")
    with torch.no_grad(), e.applied(model, seed=3, step=2):
        mine = model(x)
    # The reference: hwnoise.inject with the same key derivation (what applied() used before).
    with torch.no_grad(), hn.inject(model, hn.errors.Quantize("mxfp4:rounding=stochastic"), where="input",
                                    targets="a", seed=_derived_seed(3, 2, "inputs"), measure=False):
        ref = model(x)
    assert torch.equal(mine, ref)
    with torch.no_grad():
        assert not torch.equal(mine, model(x))


# -- issue 20 item 6: parts that do nothing are refused -----------------------------------------

@pytest.mark.parametrize("spec, words", [
    ("relative:0.05@ops+targets:layers.3", "operator noise"),
    ("relative:0.05@ops+exclude:*.down_proj", "operator noise"),
    ("aqn:0.01+targets:layers.3", "aqn:0.01"),
    ("aqn:0.01+exclude:*.q_proj", "aqn:0.01"),
])
def test_operator_noise_and_aqn_with_targets_or_exclude_are_refused(spec, words):
    with pytest.raises(ValueError, match=words):
        Emulation.parse(spec)


def test_plan_with_targets_is_refused_and_exclude_is_honoured(plan_file):
    with pytest.raises(ValueError, match="names its own modules"):
        Emulation.parse(f"weights:{plan_file}+targets:a")
    e = Emulation.parse(f"weights:{plan_file}+exclude:b")
    model = Tiny()
    wb = model.b.weight
    with e.applied(model) as stats:
        assert model.b.weight is wb and stats.weights_quantized == 1
    # Targets still select for the parts that read them.
    assert Emulation.parse(f"weights:{plan_file}+inputs:mxfp4+targets:a").targets == "a"
    assert Emulation.parse("weights:mxfp4+relative:0.05@ops+targets:a").targets == "a"


# -- issue 20 item 12: no '+' inside a number ----------------------------------------------------

def test_numbers_of_a_million_and_more_are_written_without_plus():
    assert format_number(1e6) == "1e6" and format_number(2e16) == "2e16" and format_number(1.5e300) == "1.5e300"
    assert format_number(1e-5) == "1e-05" and format_number(0.05) == "0.05"  # unchanged identities
    e = Emulation(error="relative:1e+06", aqn_sigma=2e16, weight_format="mxfp4")
    assert e.spec == "weights:mxfp4+relative:1e6@ops+aqn:2e16"
    assert Emulation.parse(e.spec) == e


_numbers = st.floats(min_value=0, max_value=1e30, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(scale=_numbers, sigma=_numbers, model=st.sampled_from(["relative", "absolute", "bias"]),
       where=st.sampled_from(["ops", "output", "input", "weight"]), fmt=st.sampled_from([None, "mxfp4", "nvfp4"]))
def test_canonical_specs_round_trip_and_hold_no_plus_in_a_number(scale, sigma, model, where, fmt):
    e = Emulation(weight_format=fmt, error=f"{model}:{scale!r}", where=where, aqn_sigma=sigma)
    for part in e.spec.split("+"):
        Emulation.parse(part)  # every part stands alone: no number was cut at its exponent sign
    assert Emulation.parse(e.spec) == e and Emulation.parse(e.spec).spec == e.spec
    assert e.scale == scale


# -- issue 20 item 13 --------------------------------------------------------------------------

def test_plan_path_that_is_a_directory_is_a_clear_error(tmp_path):
    d = tmp_path / "plans.json"
    d.mkdir()
    with pytest.raises(ValueError, match="is a directory; give the plan file in it"):
        Emulation.parse(f"weights:{d}")


def test_relative_1e308_at_ops_is_refused_up_front():
    with pytest.raises(ValueError, match="beyond float32's largest"):
        Emulation.parse("relative:1e308@ops")
    Emulation.parse("relative:1e30@ops")  # large but representable: accepted


# -- issue 20 item 14 --------------------------------------------------------------------------

def test_plan_candidates_keep_a_formats_option_list():
    cands = parse_candidates("mxfp6_e2m3,mxfp8:rceil,rounding=stochastic,bf16", "mxfp4")
    assert cands == ["mxfp4", "mxfp6_e2m3", "mxfp8:rceil,rounding=stochastic", "bf16"]
    assert registry.get(cands[2]).rounding == "stochastic"
    assert parse_candidates("mxfp8:rceil,rounding=stochastic", "mxfp4")[1] == "mxfp8:rceil,rounding=stochastic"


def test_weights_plan_txt_gets_a_clear_message(tmp_path):
    path = tmp_path / "plan.txt"
    path.write_text("{}")
    with pytest.raises(ValueError, match=r"a weight plan is a \.json file"):
        Emulation.parse(f"weights:{path}")


def test_inputs_plan_json_gets_a_clear_message(plan_file):
    with pytest.raises(ValueError, match="inputs take one format"):
        Emulation.parse(f"inputs:{plan_file}")


def test_binary_plan_file_gets_a_clear_message(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a text file"):
        Emulation.parse(f"weights:{path}")


def test_scan_json_given_as_a_plan_gets_a_clear_message(tmp_path):
    path = tmp_path / "scan.json"
    path.write_text(json.dumps({"schema_version": 3, "model": "m", "modules": [], "format": "mxfp4"}))
    with pytest.raises(ValueError, match=r"scan report \(scan\.json\), not a weight plan"):
        Emulation.parse(f"weights:{path}")
