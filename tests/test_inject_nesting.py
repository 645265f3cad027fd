"""Two weight-mode conditions at once (nested ``inject(where="weight")``, an ``Emulation`` with a
weight format around or inside one): they compose, and every Parameter comes back unchanged."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwnoise as hn
from hwnoise.errors import Quantize
from hwnoise.emulation import Emulation
from test_inject_models import bit_identical, snapshot, tiny_llama, tokens


def _weight_inject(fmt):
    return lambda model: hn.inject(model, Quantize(fmt), where="weight", targets="linear")


def _emulation(fmt, grad):
    return lambda model: Emulation(weight_format=fmt).applied(model, grad=grad)


# (outer, inner): each a callable model -> context manager.
PAIRS = {
    "inject+inject": (_weight_inject("mxfp4"), _weight_inject("nvfp4")),
    "emulation-grad+inject": (_emulation("mxfp4", True), _weight_inject("nvfp4")),
    "inject+emulation-grad": (_weight_inject("mxfp4"), _emulation("nvfp4", True)),
    "emulation+inject": (_emulation("mxfp4", False), _weight_inject("nvfp4")),
    "inject+emulation": (_weight_inject("mxfp4"), _emulation("nvfp4", False)),
}


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("inner_raises", [False, True], ids=["clean-exit", "inner-raises"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_two_weight_mode_injections_leave_no_swapped_weight(pair, inner_raises):
    outer, inner = PAIRS[pair]
    model = tiny_llama()
    ids = tokens()
    before = snapshot(model)
    params_before = dict(model.named_parameters())
    with torch.no_grad():
        loss_before = _loss(model, ids)

    @contextmanager
    def both():
        with outer(model), inner(model):
            yield

    if inner_raises:
        with pytest.raises(RuntimeError, match="inner block failed"), outer(model):
            with inner(model):
                _loss(model, ids).backward()
                raise RuntimeError("inner block failed")
    else:
        with both():
            _loss(model, ids).backward()
    assert bit_identical(snapshot(model), before)
    assert dict(model.named_parameters()) == params_before  # the same Parameter objects
    assert all(type(m._parameters["weight"]) is nn.Parameter for m in model.modules() if "weight" in m._parameters)
    with torch.no_grad():
        assert torch.equal(_loss(model, ids), loss_before)


def test_nested_weight_injections_compose_inner_sees_outer_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    lin = model[0]
    x = torch.randn(3, 64)
    w = lin.weight.detach().clone()
    with hn.inject(model, Quantize("nvfp4"), where="weight", targets="linear"):
        with hn.inject(model, Quantize("mxfp4"), where="weight", targets="linear"):
            y = model(x)
        y_outer_only = model(x)
    expected = F.linear(x, hn.quantize(hn.quantize(w, "nvfp4"), "mxfp4"), lin.bias)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(y_outer_only, F.linear(x, hn.quantize(w, "nvfp4"), lin.bias), rtol=0, atol=1e-6)
    assert not torch.allclose(y, y_outer_only)  # the inner one did act
    assert type(lin._parameters["weight"]) is nn.Parameter and torch.equal(lin.weight, w)


@pytest.mark.parametrize("order", ["inner-first", "outer-first"])
def test_nested_weight_injections_interrupted_forward_any_remove_order(order):
    # A forward stopped between pre- and post-hooks (e.g. KeyboardInterrupt): remove() restores.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    lin = model[0]
    weight = lin.weight
    outer = hn.inject(model, Quantize("mxfp4"), where="weight", targets="linear")
    inner = hn.inject(model, Quantize("nvfp4"), where="weight", targets="linear")
    for handle in (outer, inner):  # the pre-hooks, in the order forward runs them
        handle._weight_pre_hook(handle._sites["0"])(lin, ())
    assert lin._parameters["weight"] is not weight
    for handle in ((inner, outer) if order == "inner-first" else (outer, inner)):
        handle.remove()
    assert lin._parameters["weight"] is weight
