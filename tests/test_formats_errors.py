"""Bad input to quantize / encode / get: a ValueError or TypeError whose message names the bad
value and says what is accepted."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import hwnoise
from hwnoise.formats import encode, get

X = torch.randn(4, 64)


def q(x=X, fmt="mxfp4", **kw):
    return hwnoise.quantize(x, fmt, **kw)


# --------------------------------------------------------------------------------------------
# Format names and spec strings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [lambda: q(fmt="mxfp5"), lambda: get("mxfp5"), lambda: get(" MXFP5 ")])
def test_unknown_format(call):
    with pytest.raises(ValueError, match=r"(?s)'(mxfp5|MXFP5)'.*known:.*\bmxfp4\b") as info:
        call()
    # The whole list of accepted names, not just one.
    for name in hwnoise.formats.names():
        assert name in str(info.value)


def test_unknown_format_in_encode():
    with pytest.raises(ValueError, match=r"(?s)'mxfp5'.*mxfp4"):
        hwnoise.formats.encode(X, "mxfp5")


@pytest.mark.parametrize("fmt", [None, 4, 4.0, ("mxfp4",)])
def test_format_of_wrong_type(fmt):
    with pytest.raises(TypeError, match=rf"format must be a name or a FormatSpec, got {type(fmt).__name__}"):
        q(fmt=fmt)


@pytest.mark.parametrize("spec, pattern", [
    ("mxfp4:bogus", r"(?s)'bogus'.*mxfp4.*accepted.*floor.*rne.*ocp"),
    ("nvfp4:ocp", r"(?s)'ocp'.*nvfp4.*accepted.*flavors nvidia, torchao"),
    ("mxfp4:foo=1", r"(?s)'foo'.*known: scale_mode, rounding, block, flavor"),
    ("mxfp4:rounding=up", r"(?s)'up'.*known: rne, half_away, toward_zero, stochastic"),
    ("mxfp4:scale_mode=round", r"(?s)'round'.*known: floor, ceil, even, rceil"),
    ("mxfp4:flavor=nvidia", r"(?s)'nvidia'.*mxfp4.*known: ocp, torchao"),
    ("mxfp4:block=0", r"(?s)block sizes must be positive.*0"),
    ("mxfp4:block=32x32x32", r"(?s)positive int or a pair.*\(32, 32, 32\)"),
    ("nvfp4:floor", r"(?s)nvfp4 has no scale_mode.*'floor'"),
    ("bf16:block=32", r"(?s)bf16 has no blocks.*block=32"),
    ("hif4:block=32", r"(?s)hif4 groups are 64.*block=\(32,\)"),
    ("mxfp5:rceil", r"(?s)'mxfp5'.*known:.*mxfp4"),
])
def test_spec_string_errors(spec, pattern):
    # A block of three sizes is a TypeError (wrong arity), the rest ValueErrors.
    err = TypeError if spec.endswith("32x32x32") else ValueError
    with pytest.raises(err, match=pattern):
        get(spec)
    with pytest.raises(err, match=pattern):
        q(fmt=spec)


@pytest.mark.parametrize("spec, key, first, second", [
    ("mxfp4:floor,ceil", "scale_mode", "floor", "ceil"),  # kept the last one silently
    ("mxfp4:rceil,scale_mode=even", "scale_mode", "rceil", "scale_mode=even"),
    ("mxfp4:rne,stochastic", "rounding", "rne", "stochastic"),
    ("mxfp4:block=32,block=16", "block", "block=32", "block=16"),
    ("nvfp4:nvidia,flavor=torchao", "flavor", "nvidia", "flavor=torchao"),
])
def test_conflicting_format_options_are_refused(spec, key, first, second):
    pattern = rf"(?s)conflicting {key} in {re.escape(repr(spec))}.*{re.escape(repr(first))} and {re.escape(repr(second))}"
    with pytest.raises(ValueError, match=pattern):
        get(spec)
    with pytest.raises(ValueError, match=pattern):
        q(fmt=spec)


def test_repeated_identical_format_option_is_accepted():
    assert get("mxfp4:rceil,scale_mode=rceil") == get("mxfp4:rceil")


def test_spec_string_bad_block_number():
    with pytest.raises(ValueError, match=r"(?s)(?=.*'abc')(?=.*block)"):
        get("mxfp4:block=abc")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["round", "FLOOR", "", 1])
def test_unknown_scale_mode(value):
    with pytest.raises(ValueError, match=rf"(?s)unknown scale_mode {re.escape(repr(value))}.*known: floor, ceil, even, rceil"):
        q(scale_mode=value)


@pytest.mark.parametrize("value", ["nearest", "RNE", "stochastic_rounding", 0])
def test_unknown_rounding(value):
    with pytest.raises(ValueError, match=rf"(?s)unknown rounding {re.escape(repr(value))}.*known: rne, half_away, "
                                         r"toward_zero, stochastic"):
        q(rounding=value)


@pytest.mark.parametrize("fmt, flavor, known", [
    ("mxfp4", "nvidia", "ocp, torchao"),
    ("mxint8", "bogus", "ocp, torchao"),
    ("nvfp4", "ocp", "nvidia, torchao"),
    ("bf16", "ocp", r"\(none\)"),
    ("fp8_e4m3", "torchao", r"\(none\)"),
    ("hif4", "ocp", r"\(none\)"),
])
def test_unknown_flavor(fmt, flavor, known):
    with pytest.raises(ValueError, match=rf"(?s)unknown flavor '{flavor}' for {fmt}.*known: {known}"):
        q(fmt=fmt, flavor=flavor)


@pytest.mark.parametrize("fmt", ["nvfp4", "hif4", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16"])
def test_scale_mode_on_non_mx_format(fmt):
    with pytest.raises(ValueError, match=rf"(?s){fmt} has no scale_mode \(only MX formats take one\).*'floor'"):
        q(fmt=fmt, scale_mode="floor")


@pytest.mark.parametrize("block", [0, -1, (0,), (32, 0), (-16, 16)])
def test_block_not_positive(block):
    shown = re.escape(repr(block if isinstance(block, tuple) else (block,)))
    with pytest.raises(ValueError, match=rf"block sizes must be positive, got {shown}"):
        q(block=block)


@pytest.mark.parametrize("block", [32.0, 0.5, True, [32.0], (32, 32, 32), (), (16, "16"), object()])
def test_block_of_wrong_type(block):
    shown = repr(tuple(block) if isinstance(block, list) else block)
    with pytest.raises(TypeError, match=r"block must be a positive int or a pair of positive ints, got " + re.escape(shown)):
        q(block=block)


def test_block_as_string_is_a_type_error():
    with pytest.raises(TypeError, match=r"block must be a positive int or a pair of positive ints"):
        q(block="32")


def test_block_as_string_names_value():
    with pytest.raises(TypeError, match=r"got '32'"):
        q(block="32")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "bf16"])
def test_block_on_unblocked_format(fmt):
    with pytest.raises(ValueError, match=rf"{fmt} has no blocks .*do not pass block=32"):
        q(fmt=fmt, block=32)


@pytest.mark.parametrize("block", [32, 16, (64, 64), 128])
def test_hif4_block_must_be_64(block):
    with pytest.raises(ValueError, match=rf"hif4 groups are 64 elements by definition; got block="):
        q(fmt="hif4", block=block)
    assert q(fmt="hif4", block=64).shape == X.shape  # the one accepted value


@pytest.mark.parametrize("shape, axis", [((4, 64), 2), ((4, 64), -3), ((64,), 1), ((2, 3, 64), 5), ((2, 3, 64), -4)])
def test_axis_out_of_range(shape, axis):
    nd = len(shape)
    with pytest.raises(ValueError, match=rf"axis {axis} is out of range for a tensor with {nd} dims "
                                         rf"\(accepted: {-nd}\.\.{nd - 1}\)"):
        q(x=torch.randn(shape), axis=axis)


def test_tile_axis_out_of_range_and_duplicate():
    with pytest.raises(ValueError, match=r"axis 2 is out of range for a tensor with 2 dims \(accepted: -2\.\.1\)"):
        q(block=(32, 32), axis=(0, 2))
    with pytest.raises(ValueError, match=r"tile axes must differ, got \(1, -1\)"):
        q(block=(32, 32), axis=(1, -1))
    with pytest.raises(ValueError, match=r"axis 0 does not fit a 2-D block; give 2 axes"):
        q(block=(32, 32), axis=0)
    with pytest.raises(ValueError, match=r"axis \(0, 1\) does not fit a 1-D block; give 1 axes"):
        q(axis=(0, 1))
    with pytest.raises(ValueError, match=r"a 2-D tile needs a tensor of at least 2 dims, got 1"):
        q(x=torch.randn(64), block=(32, 32))


def test_axis_on_unblocked_format():
    with pytest.raises(ValueError, match=r"bf16 has no blocks, so axis=0 means nothing"):
        q(fmt="bf16", axis=0)


def test_axis_of_wrong_type():
    with pytest.raises(TypeError, match=r"axis must be an int.*, got '0'"):
        q(axis="0")
    with pytest.raises(TypeError, match=r"axis must be an int.*, got True"):
        q(axis=True)


def test_float_axis_names_value():
    with pytest.raises(TypeError, match=r"axis must be an int.*, got 1\.5"):
        q(axis=1.5)


@pytest.mark.parametrize("ste", ["straight", "", None, "Identity"])
def test_unknown_ste(ste):
    with pytest.raises(ValueError, match=rf"unknown ste {re.escape(repr(ste))}; known: identity, clipped"):
        q(ste=ste)


# --------------------------------------------------------------------------------------------
# The tensor itself
# --------------------------------------------------------------------------------------------

ACCEPTED = r"float32, bfloat16 or float16"


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp8_e4m3", "bf16"])
def test_unsupported_dtype(dtype, fmt):
    x = torch.zeros(4, 64, dtype=dtype)
    pattern = rf"quantize expects a {ACCEPTED} tensor, got {re.escape(str(dtype))}"
    with pytest.raises(TypeError, match=pattern):
        q(x=x, fmt=fmt)
    with pytest.raises(TypeError, match=pattern):
        encode(x, fmt)


@pytest.mark.parametrize("x, typename", [([1.0, 2.0], "list"), (np.ones(4, dtype=np.float32), "ndarray"),
                                         (1.0, "float"), (None, "NoneType")])
def test_non_tensor_input(x, typename):
    with pytest.raises(TypeError, match=rf"quantize expects a torch\.Tensor, got {typename}"):
        q(x=x)
    with pytest.raises(TypeError, match=rf"got {typename}"):
        encode(x, "mxfp4")


def test_dtype_checked_before_options():
    # A wrong dtype is reported even when the options are fine, and a wrong option with a good dtype.
    with pytest.raises(TypeError, match="float64"):
        q(x=X.double(), scale_mode="floor")


# --------------------------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out, got", [
    (torch.empty(4, 63), r"\(4, 63\)"),
    (torch.empty(64, 4), r"\(64, 4\)"),
    (torch.empty(256), r"\(256,\)"),
    (torch.empty(4, 64, dtype=torch.bfloat16), r"torch\.bfloat16"),
    (np.empty((4, 64), dtype=np.float32), r"ndarray"),
])
def test_out_mismatch(out, got):
    with pytest.raises(ValueError, match=rf"(?s)out must match x \(shape \(4, 64\), torch\.float32, cpu\); got .*{got}"):
        q(out=out)


def test_out_with_requires_grad():
    x = X.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"out= cannot be used when x requires grad"):
        q(x=x, out=torch.empty_like(X))


def test_out_accepted_when_it_matches():
    out = torch.empty_like(X)
    y = q(out=out)
    assert y.data_ptr() == out.data_ptr() and torch.equal(out, q())


# --------------------------------------------------------------------------------------------
# The same checks through encode() and saturation_ratio(fmt=...)
# --------------------------------------------------------------------------------------------


def test_encode_validates_like_quantize():
    with pytest.raises(ValueError, match=r"unknown scale_mode 'round'"):
        encode(X, "mxfp4", scale_mode="round")
    with pytest.raises(ValueError, match=r"axis 3 is out of range for a tensor with 2 dims \(accepted: -2\.\.1\)"):
        encode(X, "mxfp4", axis=3)
    with pytest.raises(ValueError, match=r"hif4 groups are 64 elements by definition; got block=\(32,\)"):
        encode(X, "hif4", block=32)


def test_metrics_with_format_validate_options():
    with pytest.raises(ValueError, match=r"'mxfp5'.*mxfp4"):
        hwnoise.metrics.saturation_ratio(X, X, "mxfp5")
    with pytest.raises(ValueError, match=r"unknown rounding 'up'"):
        hwnoise.metrics.saturation_ratio(X, X, "mxfp4", rounding="up")
    with pytest.raises(TypeError, match=r"unknown format option\(s\) bogus; accepted: scale_mode, rounding, block, axis"):
        hwnoise.metrics.saturation_ratio(X, X, "mxfp4", bogus=1)
