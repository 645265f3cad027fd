"""Operator-level noise: routing, noisy backward, the aten audit, determinism, compile, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hwnoise as hn
from hwnoise.errors import RelativeGaussian, SystematicBias, noise_key
from test_inject_models import AtOnlyNet, MatmulNet, bit_identical, snapshot, tiny_llama, tiny_mixtral, tokens

aten = torch.ops.aten
REL = RelativeGaussian(0.05)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# --- routing and scope ------------------------------------------------------------------------------


def test_every_spelling_is_routed_and_nothing_stays_changed():
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    clean = F.linear(x, w)
    linear, matmul = F.linear, torch.matmul
    with hn.noisy_ops(REL) as mode:
        outs = [F.linear(x, w), x @ w.t(), torch.matmul(x, w.t()), x.matmul(w.t()),
                torch.bmm(x[None], w.t()[None])[0], x[None].bmm(w.t()[None])[0], w.t().__rmatmul__(x)]
    assert mode.stats() == {"linear": 1, "matmul": 4, "bmm": 2}
    for out in outs:
        assert 0.02 < _rel(out, clean) < 0.1
    assert len({o.sum().item() for o in outs}) == len(outs)  # each call its own draw
    assert F.linear is linear and torch.matmul is matmul
    assert torch.overrides._get_current_function_mode_stack() == []
    assert torch.equal(F.linear(x, w), clean)


def test_scope_ends_on_exception_too():
    with pytest.raises(RuntimeError):
        with hn.noisy_ops(REL):
            F.linear(torch.randn(2, 3), torch.randn(4, 5))
    assert torch.overrides._get_current_function_mode_stack() == []


def test_all_ops():
    torch.manual_seed(0)
    x = torch.randn(4, 16, requires_grad=True)
    ln_w = torch.randn(16, requires_grad=True)
    calls = {
        "softmax": lambda: F.softmax(x, -1), "softmax_t": lambda: x.softmax(-1), "silu": lambda: F.silu(x),
        "gelu": lambda: F.gelu(x), "layer_norm": lambda: F.layer_norm(x, (16,), ln_w),
        "rms_norm": lambda: F.rms_norm(x, (16,), ln_w),
    }
    clean = {k: f() for k, f in calls.items()}
    with hn.noisy_ops(REL, ops="all") as mode:
        noisy = {k: f() for k, f in calls.items()}
    assert mode.stats() == {"softmax": 2, "silu": 1, "gelu": 1, "layer_norm": 1, "rms_norm": 1}
    for k in calls:
        assert 0.02 < _rel(noisy[k], clean[k]) < 0.1, k
    # Norm weights get a noisy grad_weight, the input a noisy grad_input (forward off: only backward noise).
    gc = torch.autograd.grad(F.rms_norm(x, (16,), ln_w).pow(2).sum(), (x, ln_w))
    with hn.noisy_ops(REL, ops="all", forward=False):
        gn = torch.autograd.grad(F.rms_norm(x, (16,), ln_w).pow(2).sum(), (x, ln_w))
    assert 0.03 < _rel(gn[0], gc[0]) < 0.07 and 0.02 < _rel(gn[1], gc[1]) < 0.1


def test_sdpa_runs_as_noisy_math():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    clean = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with hn.noisy_ops(SystematicBias(0.0), ops=("sdpa",)) as mode:  # no noise: the math path equals SDPA
        same = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(same, clean, rtol=1e-5, atol=1e-5)
    assert mode.stats() == {"matmul": 2, "softmax": 1}
    with hn.noisy_ops(REL, ops=("sdpa",)):
        noisy = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert 0.01 < _rel(noisy, clean) < 0.2


# --- 3. measured forward error --------------------------------------------------------------------


def test_measured_relative_error_on_linears():
    torch.manual_seed(0)
    x, w = torch.randn(64, 128), torch.randn(256, 128)
    clean = F.linear(x, w)
    with hn.noisy_ops(REL, ops=("linear",)):
        measured = [_rel(F.linear(x, w), clean) for _ in range(5)]
    for m in measured:
        assert abs(m - 0.05) <= 0.005, measured


# --- 2. backward coverage ----------------------------------------------------------------------------


def _grads(f, tensors, **kwargs):
    if kwargs:
        with hn.noisy_ops(REL, **kwargs):
            return torch.autograd.grad(f(), tensors)
    return torch.autograd.grad(f(), tensors)


def test_backward_noise_has_the_requested_relative_magnitude():
    torch.manual_seed(0)
    x = torch.randn(64, 128, requires_grad=True)
    w = torch.randn(96, 128, requires_grad=True)
    c = torch.randn(64, 96)
    for name, f in (("linear", lambda: (F.linear(x, w) * c).sum()), ("matmul", lambda: ((x @ w.t()) * c).sum()),
                    ("bmm", lambda: (torch.bmm(x[None], w.t()[None])[0] * c).sum())):
        clean = _grads(f, (x, w))
        noisy = _grads(f, (x, w), forward=False, backward=True)
        for got, ref in zip(noisy, clean):
            assert abs(_rel(got, ref) - 0.05) <= 0.2 * 0.05, name
        assert all(torch.equal(a, b) for a, b in zip(_grads(f, (x, w), forward=False, backward=False), clean))
        # grad_input and grad_weight draw independently: their relative noise is uncorrelated.
        ex = ((noisy[0] - clean[0]) / clean[0]).flatten()
        ew = ((noisy[1] - clean[1]) / clean[1]).flatten()
        n = min(ex.numel(), ew.numel())
        assert abs(float(torch.corrcoef(torch.stack([ex[:n], ew[:n]]))[0, 1])) < 0.05


def test_parameter_gradients_of_a_model():
    model = MatmulNet()
    x = torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(1))

    def grads(**kwargs):
        model.zero_grad()
        if kwargs:
            with hn.noisy_ops(REL, **kwargs):
                model(x).pow(2).sum().backward()
        else:
            model(x).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    clean = grads()
    off = grads(forward=False, backward=False)
    assert all(torch.equal(off[n], clean[n]) for n in clean)  # backward noise off: bit-identical
    noisy = grads(forward=False, backward=True)
    # The last layer's weight gradient comes from one noisy GEMM: exactly the requested magnitude.
    assert abs(_rel(noisy["out.weight"], clean["out.weight"]) - 0.05) <= 0.01
    for n in clean:  # deeper weights accumulate several noisy GEMMs: more, never less
        if clean[n].dim() == 2:
            assert 0.04 < _rel(noisy[n], clean[n]) < 0.3, n
        else:  # a bias gradient is a sum over noisy grad rows: the noise averages down, but is there
            assert 0.0 < _rel(noisy[n], clean[n]) < 0.3, n
    # Forward noise alone: with a loss linear in the output, dL/dW of the last layer is x^T c, clean.
    lin = nn.Linear(16, 4)
    c = torch.randn(8, 4)
    xin = torch.randn(8, 16)
    g_clean = torch.autograd.grad((lin(xin) * c).sum(), lin.weight)[0]
    with hn.noisy_ops(REL, backward=False):
        g_fwd = torch.autograd.grad((lin(xin) * c).sum(), lin.weight)[0]
    assert torch.equal(g_fwd, g_clean)


# --- 2. the aten audit ------------------------------------------------------------------------------

GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default}
# Ops that only move or reshape a GEMM result: their output is still the raw (unperturbed) result.
MOVES = {"view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "alias",
         "detach", "squeeze", "unsqueeze", "clone", "contiguous", "_to_copy", "as_strided"}


class GemmAudit(TorchDispatchMode):
    """Follows every aten mm/addmm/bmm result until its first real use.

    With ``SystematicBias(s)`` as the error, a perturbed result is exactly ``y + s * y``; the audit
    records, per GEMM, whether that perturbation was the first thing done to it (``perturbed``)
    and any other op that consumed the raw result (``leaks``).
    """

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.gemms = []  # {"op", "perturbed", "leaks"}
        self.raw = {}  # id(tensor) -> (gemm index, tensor): kept alive so ids are not reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        for t in inputs:
            entry = self.raw.get(id(t))
            if entry is None or entry[1] is not t:
                continue
            index = entry[0]
            for o in outputs:
                if name in MOVES:
                    self.raw[id(o)] = (index, o)
                elif o.shape == t.shape and torch.allclose(o, t + self.scale * t, rtol=1e-6, atol=0):
                    self.gemms[index]["perturbed"] = True
                else:
                    self.gemms[index]["leaks"].append(name)
        if func in GEMMS:
            self.raw[id(out)] = (len(self.gemms), out)
            self.gemms.append({"op": name, "perturbed": False, "leaks": []})
        return out


def _audit(model, inputs, ops=("linear", "matmul", "bmm"), scale=0.25):
    def run():
        model.zero_grad()
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        logits = out.logits if hasattr(out, "logits") else out
        logits.float().pow(2).mean().backward()

    with GemmAudit(scale) as clean:
        run()
    with hn.noisy_ops(SystematicBias(scale), ops=ops) as mode, GemmAudit(scale) as noisy:
        run()
    return clean.gemms, noisy.gemms, mode.stats()


@pytest.mark.parametrize("which", ["matmul_net", "at_only", "llama_eager", "mixtral"])
def test_audit_every_gemm_forward_and_backward_is_perturbed(which):
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    model, inputs = {
        "matmul_net": (MatmulNet(), x), "at_only": (AtOnlyNet(), x),
        "llama_eager": (tiny_llama(), {"input_ids": tokens()}), "mixtral": (tiny_mixtral(), {"input_ids": tokens()}),
    }[which]
    clean, noisy, stats = _audit(model, inputs)
    assert len(noisy) == len(clean) > 0  # the same GEMMs run; none replaced by something unaudited
    assert sum(stats.values()) * 3 >= len(noisy)  # forward + up to two backward GEMMs per noisy call
    bad = [g for g in noisy if not g["perturbed"] or g["leaks"]]
    assert not bad, f"{len(bad)} of {len(noisy)} GEMMs unperturbed or leaked: {bad[:5]}"
    if which == "at_only":
        assert stats == {"matmul": 2} and len(noisy) == 2 + 3  # two `@` forward, three backward (x needs no grad)


def test_audit_can_fail():
    # The audit is not vacuous: with "linear" only, the `@` GEMMs of AtOnlyNet are reported clean.
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    _, noisy, stats = _audit(AtOnlyNet(), x, ops=("linear",))
    assert stats == {} and len(noisy) == 5 and not any(g["perturbed"] for g in noisy)
    assert all(g["leaks"] for g in noisy)


# --- 4. determinism ------------------------------------------------------------------------------------


def _llama_run(model, seed, **kwargs):
    model.zero_grad()
    with hn.noisy_ops(REL, seed=seed, **kwargs):
        loss = model(input_ids=tokens(), labels=tokens()).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_same_seed_bit_identical_other_seed_differs():
    model = tiny_llama()
    before = snapshot(model)
    a, ga = _llama_run(model, 0, ops="all")
    b, gb = _llama_run(model, 0, ops="all")
    c, gc = _llama_run(model, 1, ops="all")
    assert torch.equal(a, b) and all(torch.equal(ga[n], gb[n]) for n in ga)
    assert not torch.equal(a, c) and not torch.equal(ga["lm_head.weight"], gc["lm_head.weight"])
    assert bit_identical(snapshot(model), before)


def test_noise_is_keyed_not_sequential():
    # A draw depends on (seed, op, role, step) only: global RNG use in between changes nothing,
    # and the forward noise of call n is exactly error.apply(y, key(seed, op, "forward", n)).
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with hn.noisy_ops(REL, seed=5):
        first = F.linear(x, w)
        torch.randn(1000)
        second = F.linear(x, w)
    assert torch.equal(first, REL.apply(F.linear(x, w), noise_key(5, "linear", "forward", 0)))
    assert torch.equal(second, REL.apply(F.linear(x, w), noise_key(5, "linear", "forward", 1)))


def test_different_sites_uncorrelated():
    torch.manual_seed(0)
    x, w = torch.randn(128, 256), torch.randn(256, 256)
    clean = F.linear(x, w)
    with hn.noisy_ops(REL, ops=("linear", "matmul")):
        outs = [F.linear(x, w), F.linear(x, w), x @ w.t()]
    eps = [((o - clean) / (0.05 * clean)).flatten() for o in outs]
    corr = torch.corrcoef(torch.stack(eps))
    assert all(abs(float(corr[i, j])) < 0.05 for i in range(3) for j in range(i + 1, 3)), corr


# --- 5. compile -------------------------------------------------------------------------------------------


def test_compiled_noisy_forward_backward_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    model = MatmulNet()
    x = torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(1))
    graphs = []

    def backend(gm, example_inputs):  # inductor, counting the graphs it is given
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    def run(fn, noisy):
        model.zero_grad()
        if noisy:
            with hn.noisy_ops(REL, ops="all") as mode:
                out = fn(x)
                out.pow(2).sum().backward()
            assert mode.stats()["linear"] == 2 and mode.stats()["bmm"] == 1
        else:
            out = fn(x)
            out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    compiled = torch.compile(model, backend=backend)
    clean_y, clean_g = run(model, False)
    eager_y, eager_g = run(model, True)
    comp_y, comp_g = run(compiled, True)
    assert graphs, "torch.compile produced no graph"
    assert not torch.equal(comp_y, clean_y)
    # Same keys, same draws: compiled noisy equals eager noisy (up to fused-kernel rounding).
    torch.testing.assert_close(comp_y, eager_y, rtol=1e-4, atol=1e-5)
    for n in clean_g:
        torch.testing.assert_close(comp_g[n], eager_g[n], rtol=1e-4, atol=1e-5)
        assert not torch.equal(comp_g[n], clean_g[n])
    assert abs(_rel(comp_y, clean_y) - _rel(eager_y, clean_y)) < 1e-3
    # Compiled outside the block, called clean: no noise (the mode is a guard, not baked in).
    assert torch.equal(compiled(x).detach(), clean_y) or torch.allclose(compiled(x), clean_y, rtol=1e-5, atol=1e-6)


def test_fullgraph_compile_keeps_the_noise():
    import torch._dynamo

    torch._dynamo.reset()
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    compiled = torch.compile(lin, fullgraph=True)  # no graph break: the draws are custom ops
    with hn.noisy_ops(REL) as mode:
        noisy = compiled(x)
    assert mode.stats() == {"linear": 1}
    torch.testing.assert_close(noisy, REL.apply(lin(x), noise_key(0, "linear", "forward", 0)), rtol=1e-5, atol=1e-6)


def test_phase_restricted_mode_under_compile_follows_the_phase():
    # The phase is read per call, so this mode refuses to be traced; dynamo runs the frame eagerly
    # instead, and the phase still decides: never a clean run where noise was asked for.
    import torch._dynamo

    torch._dynamo.reset()
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    compiled = torch.compile(lin, backend="aot_eager")
    with hn.noisy_ops(REL, phase="rollout"):
        with hn.phase("rollout"):
            noisy = compiled(x)
        with hn.phase("training"):
            clean = compiled(x)
        with hn.phase("rollout"):
            again = compiled(x)
    assert torch.equal(clean, lin(x))
    assert torch.equal(noisy, REL.apply(lin(x), noise_key(0, "linear", "forward", 0)))
    assert torch.equal(again, REL.apply(lin(x), noise_key(0, "linear", "forward", 1)))


# --- 7. bad input ----------------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"unknown op 'conv2d'; known: linear, matmul, bmm, .*\(or 'all'\)"):
        hn.noisy_ops(REL, ops=("linear", "conv2d"))
    with pytest.raises(ValueError, match=r"unknown op 'lienar'"):
        hn.noisy_ops(REL, ops="lienar,matmul")
    with pytest.raises(ValueError, match="unknown error model 'noise'"):
        hn.noisy_ops("noise")
    with pytest.raises(ValueError, match="scale must be finite and >= 0; got -0.05"):
        hn.noisy_ops(RelativeGaussian(-0.05))
    with pytest.raises(ValueError, match="backward must be True or False; got 'yes'"):
        hn.noisy_ops(REL, backward="yes")
    with pytest.raises(ValueError, match=r"unknown phase 'train'; known: rollout, training, both"):
        hn.noisy_ops(REL, phase="train")
    a, out = torch.randn(2, 2), torch.empty(2, 2)
    with hn.noisy_ops(REL) as mode:  # out= passes through (compiled code calls its kernels that way)
        torch.matmul(a, a, out=out)
    assert torch.equal(out, a @ a) and mode.stats() == {}
    assert torch.overrides._get_current_function_mode_stack() == []


def test_phase_restricted_ops():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    clean = F.linear(x, w)
    with hn.noisy_ops(REL, phase="rollout"):
        assert torch.equal(F.linear(x, w), clean)
        with hn.phase("rollout"):
            assert not torch.equal(F.linear(x, w), clean)


def test_quantize_error_at_operator_level_and_bf16():
    from hwnoise.errors import Quantize

    torch.manual_seed(0)
    x, w = torch.randn(256, 512), torch.randn(512, 512)  # 131k outputs: hwnoise.quantize's compiled path
    with hn.noisy_ops(Quantize("mxfp4"), ops=("linear",)):
        y = F.linear(x, w)
    assert torch.equal(y, hn.quantize(F.linear(x, w), "mxfp4"))
    xb, wb = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    with hn.noisy_ops(REL):
        yb = F.linear(xb, wb)
        yb.float().pow(2).sum().backward()
    assert yb.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert abs(_rel(yb.float(), F.linear(xb, wb).float()) - 0.05) < 0.005


def test_backward_after_the_block_and_bounded_registry():
    from hwnoise.inject import ops

    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    with hn.noisy_ops(REL, forward=False) as mode:
        y = F.linear(x, w)
    y.sum().backward()  # backward after the block still draws its keyed noise
    assert not torch.equal(w.grad, torch.ones(4, 8).t() @ x.detach())
    for _ in range(ops.RETAINED_EXITED + 5):
        with hn.noisy_ops(REL):
            pass
    assert len(ops._MODES) <= ops.RETAINED_EXITED + 1 and mode._id not in ops._MODES
    with hn.noisy_ops(REL, forward=False) as late:
        y = F.linear(x, w)
    for _ in range(ops.RETAINED_EXITED + 1):
        with hn.noisy_ops(REL):
            pass
    w.grad = None
    y.sum().backward()  # eager: the backward holds its own key, no registry needed
    assert torch.equal(w.grad, REL.apply(torch.ones(4, 8).t() @ x.detach(), noise_key(0, "linear", "grad_weight", 0)))
    # compiled code names its mode by id: past the bound, the custom op says why it cannot draw
    with pytest.raises(RuntimeError, match="backward ran after 256 other noisy_ops blocks"):
        torch.ops.hwnoise.keyed_noise(torch.ones(2), torch.tensor(0), late._id, "linear", "grad_input")


def test_forward_noise_is_the_same_with_and_without_autograd():
    """Without autograd the forward noise takes a direct path (no custom-op dispatch); it must draw
    exactly what the custom ops draw when gradients are on."""
    model = MatmulNet()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), hn.noisy_ops(REL, seed=4):
        direct = model(x)
    with hn.noisy_ops(REL, seed=4):  # backward noise on: every call goes through the custom ops
        through_ops = model(x)
    with hn.noisy_ops(REL, seed=4, backward=False):  # grad on, backward off: keyed_noise keeps its STE
        forward_only = model(x)
    assert torch.equal(direct, through_ops.detach())
    assert torch.equal(direct, forward_only.detach())
    with torch.no_grad():
        assert not torch.equal(direct, model(x))


def test_resolve_ops_is_the_public_op_list_parser():
    from hwnoise.emulation import Emulation
    from hwnoise.inject import ALL_OPS, resolve_ops
    from hwnoise.inject.env import HwnoiseEnvError, config_from_env

    assert resolve_ops(" all ") == ALL_OPS and resolve_ops("matmul, linear,matmul") == ("matmul", "linear")
    with pytest.raises(ValueError, match="unknown op 'nope'; known: linear"):
        resolve_ops("linear,nope")
    # the spec grammar and the environment read op lists through it
    assert Emulation.parse("relative:0.05@ops[ all ]").ops == ALL_OPS
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        Emulation.parse("relative:0.05@ops[nope]")
    with pytest.raises(HwnoiseEnvError, match="HWNOISE_OPS='linear,nope'"):
        config_from_env({"HWNOISE_ERROR": "relative:0.05", "HWNOISE_OPS": "linear,nope"})
