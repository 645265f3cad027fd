"""Operator noise covers every GEMM form, forward and backward, with keyed draws (issue 13).

Before: torch.mm, torch.addmm, torch.baddbmm, torch.einsum (and so Hugging Face's Conv1D, the
GPT-2 family's linear layer, which calls torch.addmm) ran clean inside ``noisy_ops(..., ops="all")``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hwnoise as hn
from hwnoise.errors import RelativeGaussian, noise_key

REL = RelativeGaussian(0.05)
SEED = 11


def _t(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


A2, B2, C2 = _t(5, 7, seed=0), _t(7, 3, seed=1), _t(5, 3, seed=2)   # a @ b (+ c)
A3, B3, C3 = _t(2, 5, 7, seed=3), _t(2, 7, 3, seed=4), _t(2, 5, 3, seed=5)

# name: (call, operands a, b, extra (a bias, no grad), op name it counts under, clean GEMM of a, b)
FORMS = {
    "torch.mm": (lambda a, b, c: torch.mm(a, b), A2, B2, None, "matmul"),
    "Tensor.mm": (lambda a, b, c: a.mm(b), A2, B2, None, "matmul"),
    "torch.linalg.matmul": (lambda a, b, c: torch.linalg.matmul(a, b), A2, B2, None, "matmul"),
    "torch.addmm": (lambda a, b, c: torch.addmm(c, a, b), A2, B2, C2, "linear"),
    "Tensor.addmm": (lambda a, b, c: c.addmm(a, b, beta=0.5, alpha=2.0), A2, B2, C2, "linear"),
    "torch.baddbmm": (lambda a, b, c: torch.baddbmm(c, a, b), A3, B3, C3, "bmm"),
    "Tensor.baddbmm": (lambda a, b, c: c.baddbmm(batch1=a, batch2=b, alpha=0.5), A3, B3, C3, "bmm"),
    "torch.addbmm": (lambda a, b, c: torch.addbmm(c[0], a, b), A3, B3, C3, "bmm"),
    "torch.einsum": (lambda a, b, c: torch.einsum("bij,bjk->bik", a, b), A3, B3, None, "matmul"),
    "torch.einsum list": (lambda a, b, c: torch.einsum("bij,bjk->bik", [a, b]), A3, B3, None, "matmul"),
    "torch.einsum sublist": (lambda a, b, c: torch.einsum(a, [0, 1, 2], b, [0, 2, 3], [0, 1, 3]), A3, B3, None,
                             "matmul"),
    "Tensor.__matmul__": (lambda a, b, c: a @ b, A3, B3, None, "matmul"),
}


def _reference(form, a, b, c):
    """The clean result, from an independent formulation (elementwise products summed)."""
    prod = (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    if form == "Tensor.addmm":
        return 0.5 * c + 2.0 * prod
    if form == "Tensor.baddbmm":
        return c + 0.5 * prod
    if form == "torch.addbmm":
        return c[0] + prod.sum(0)
    return prod + c if c is not None else prod


@pytest.mark.parametrize("form", list(FORMS))
def test_operator_noise_covers_every_gemm_form(form):
    call, a, b, c, op = FORMS[form]
    clean = _reference(form, a, b, c)
    assert torch.allclose(call(a, b, c), clean, atol=1e-5)
    # forward: exactly the keyed draw of call 0 of that op
    with hn.noisy_ops(REL, ops="all", seed=SEED) as mode:
        y = call(a, b, c)
    assert mode.stats() == {op: 1}, f"{form} was not routed to a noisy op"
    expected = REL.apply(clean, noise_key(SEED, op, "forward", 0))
    assert not torch.allclose(y, clean, atol=1e-3)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-5)
    # backward: both operands' gradients get their keyed draws (grad_input, grad_weight)
    ga, gb = a.clone().requires_grad_(), b.clone().requires_grad_()
    cotangent = torch.randn(clean.shape, generator=torch.Generator().manual_seed(9))
    clean_ga, clean_gb = torch.autograd.grad((_reference(form, ga, gb, c) * cotangent).sum(), (ga, gb))
    with hn.noisy_ops(REL, ops="all", seed=SEED, forward=False):
        noisy_ga, noisy_gb = torch.autograd.grad((call(ga, gb, c) * cotangent).sum(), (ga, gb))
    assert torch.allclose(noisy_ga, REL.apply(clean_ga, noise_key(SEED, op, "grad_input", 0)), rtol=1e-4, atol=1e-5)
    assert torch.allclose(noisy_gb, REL.apply(clean_gb, noise_key(SEED, op, "grad_weight", 0)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(noisy_ga, clean_ga, atol=1e-3) and not torch.allclose(noisy_gb, clean_gb, atol=1e-3)


def test_einsum_of_one_operand_is_not_a_gemm():
    x = _t(4, 4, seed=0)
    with hn.noisy_ops(REL, ops="all") as mode:
        assert torch.equal(torch.einsum("ii->i", x), torch.diagonal(x))
        assert torch.equal(torch.einsum("ij->ji", x), x.t())
    assert mode.stats() == {}


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).eval()


def _gpt2_run(model, ids, **noise):
    """(Conv1D outputs by module name, loss, grads) of one forward+backward, under noise if given."""
    from transformers.pytorch_utils import Conv1D

    outputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach())))
    model.zero_grad()
    try:
        if noise:
            with hn.noisy_ops(REL, **noise) as mode:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
        else:
            mode = None
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return outputs, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, mode


def test_gpt2_conv1d_runs_noisy_under_noisy_ops():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    clean_out, clean_loss, clean_grads, _ = _gpt2_run(model, ids)
    assert len(clean_out) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    for ops in ("all", ("linear",)):
        out, loss, grads, mode = _gpt2_run(model, ids, ops=ops, seed=0)
        assert mode.stats()["linear"] == 8 + 1  # the eight Conv1D addmm calls and lm_head's F.linear
        for name in clean_out:
            assert not torch.allclose(out[name], clean_out[name], atol=1e-6), f"{name} ran clean under ops={ops}"
        assert loss != clean_loss
        for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
            assert not torch.allclose(grads[name], clean_grads[name], atol=1e-7), f"{name}.grad clean under ops={ops}"
    # backward noise alone moves the Conv1D weight gradients too, and only those
    out, loss, grads, _ = _gpt2_run(model, ids, ops=("linear",), forward=False)
    assert torch.equal(loss, clean_loss) and all(torch.equal(out[n], clean_out[n]) for n in clean_out)
    assert not torch.allclose(grads["transformer.h.0.mlp.c_proj.weight"], clean_grads["transformer.h.0.mlp.c_proj.weight"],
                              atol=1e-7)


def test_gpt2_every_aten_gemm_forward_and_backward_is_perturbed():
    # The aten-level audit of test_noisy_ops (every mm/addmm/bmm result perturbed before first use).
    from test_noisy_ops import _audit

    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    clean, noisy, stats = _audit(tiny_gpt2().train(), {"input_ids": ids})
    assert len(noisy) == len(clean) > 0 and stats["linear"] == 9
    bad = [g for g in noisy if not g["perturbed"] or g["leaks"]]
    assert not bad, f"{len(bad)} of {len(noisy)} GEMMs unperturbed or leaked: {bad[:5]}"


def test_audit_mode_says_what_was_noised_and_what_ran_clean():
    x, w = _t(4, 8, seed=0), _t(8, 8, seed=1)
    image, kernel = _t(1, 2, 8, seed=2), _t(3, 2, 3, seed=3)
    with hn.noisy_ops(REL, ops=("linear",), audit=True) as mode:
        F.linear(x, w)
        x @ w
        torch.tensordot(x, w, dims=1)
        F.conv1d(image, kernel)
        x.view(-1)
    report = mode.audit()
    assert report["noised"] == {"linear": 1}
    assert report["unnoised_gemms"] == {"Tensor.matmul": 1, "torch.tensordot": 1, "torch.conv1d": 1}
    assert report["passed"]["Tensor.view"] == 1
    with hn.noisy_ops(REL) as plain:
        F.linear(x, w)
    with pytest.raises(RuntimeError, match=r"audit\(\) needs noisy_ops\(\.\.\., audit=True\)"):
        plain.audit()
    with pytest.raises(ValueError, match="audit must be True or False; got 'yes'"):
        hn.noisy_ops(REL, audit="yes")


class _TensorsMade(TorchDispatchMode):
    """Records every integer tensor made and every device-to-host read (``.item()``)."""

    def __init__(self):
        super().__init__()
        self.int_tensors, self.host_reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads.append(str(func))
        self.int_tensors += [str(func) for t in tree_leaves(out)
                             if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        return out


def test_noisy_ops_makes_no_tensor_per_call_on_the_eager_path():
    # Engineers on CUDA need the hot path free of host work: no .item(), no per-call step tensors.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    x = _t(4, 8, seed=0).requires_grad_()
    for kwargs in ({}, {"backward": False}, {"forward": False}):
        with hn.noisy_ops(REL, **kwargs) as mode, _TensorsMade() as seen:
            model(x).pow(2).sum().backward()
        assert seen.int_tensors == [] and seen.host_reads == [], (kwargs, seen.int_tensors, seen.host_reads)
        assert mode.stats() == {"linear": 2}
    with torch.no_grad(), hn.noisy_ops(REL), _TensorsMade() as seen:
        model(x)
    assert seen.int_tensors == [] and seen.host_reads == []
