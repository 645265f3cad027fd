"""Operator-level noise: ``noisy_ops(error)`` routes every GEMM form (and more) to noisy ops.

Inside ``with noisy_ops(error, ops=("linear", "matmul", "bmm")):`` every GEMM call runs a noisy
version whose backward is noisy too. The three GEMM ops and the calls each one takes:

    linear   F.linear; torch.addmm / Tensor.addmm (x @ W + b: Hugging Face's Conv1D, GPT-2 family)
    matmul   torch.matmul, Tensor.matmul, ``@``, torch.mm, Tensor.mm, torch.linalg.matmul,
             torch.einsum of two or more operands (every spelling: equation, list, sublists)
    bmm      torch.bmm, Tensor.bmm, torch.baddbmm, Tensor.baddbmm, torch.addbmm, Tensor.addbmm

    y        = error(x @ W^T + b)                    key (seed, op, "forward",     step)
    grad x   = error(grad_y @ W)                     key (seed, op, "grad_input",  step)
    grad W   = error(grad_y^T @ x)                   key (seed, op, "grad_weight", step)

The noise models accumulation in a GEMM: a call whose contraction sums over nothing (K = 1: an
outer product such as the RoPE angle table, ``inv_freq_expanded @ position_ids_expanded`` in
transformers 5.x or ``torch.einsum("i,j->ij", t, inv_freq)`` in vLLM) is exact on hardware too and
passes clean, forward and backward, without taking a step. K is ``a.shape[-1]`` for the ``a @ b``
forms and F.linear (in_features), batches x inner for addbmm, and for einsum the product of the
sizes of the indices summed away.

For ``a @ b`` forms the first operand's gradient is "grad_input" and the second's "grad_weight"
(an added bias's gradient is clean, as F.linear's). The site is the operator's name and the step
counts that operator's calls since the block was entered, so a replay of the same program in a
fresh block draws the same noise; the backward of a call uses its forward's step, whatever order
autograd runs it in.

``ops="all"`` adds softmax, silu, gelu, layer_norm and rms_norm (``F.*``, ``torch.*`` and Tensor
methods): noisy result, noisy grad_input, and a noisy grad_weight for the norms' weights.
Hugging Face's RMSNorm (Llama, Qwen, Mistral) is hand-written arithmetic, not an ``rms_norm``
call: cover it at module level, ``hwnoise.inject(model, error, targets="rmsnorm")``. Fused
attention (``F.scaled_dot_product_attention``) is one kernel, not matmul calls: load the model
with ``attn_implementation="eager"`` to have its two GEMMs noised, or add op "sdpa", which runs
it as noisy matmul -> softmax -> matmul.

What was noised: ``mode.stats()`` counts the noisy calls per op; ``noisy_ops(..., audit=True)``
also counts every torch call that passed through clean, and ``mode.audit()["unnoised_gemms"]``
names the GEMM-like ones (a GEMM of an op left out of ``ops``, convolutions, ``tensordot``, fused
attention without "sdpa", calls with ``out=``). A GEMM inside a custom kernel (a C++/Triton
extension) makes no torch call and is not seen: check with ``audit`` once per new model.

Mechanism: a ``torch.overrides.TorchFunctionMode`` (a registry keyed by operator, pushed on entry
and popped on exit: nothing global stays changed after the block). A ``with`` block is per thread;
``hwnoise.inject.env.enable_from_env`` (``import hwnoise.autoload``) is the process-wide switch.
In eager mode the step and keys are Python ints and the gradient noise an autograd.Function that
holds its key: no tensor is made and nothing is read back from the device per call. Under
``torch.compile`` the draws are two custom ops, ``hwnoise::next_step`` and ``hwnoise::keyed_noise``:
``torch.compile`` traces through the mode and keeps them as opaque graph nodes (no graph break;
``fullgraph=True`` works), and they run eagerly at run time, so the step counters advance per call,
not per trace. The compiler may order independent calls differently from eager mode, so compiled
and eager runs draw the same distribution but not always the same step for the same call.
(Graph breaks inside a torch function mode mis-compile in torch 2.13; this design avoids them.)
Calls with ``out=`` pass through unchanged: compiled code runs its GEMM kernels that way, inside
the mode, after the noise ops were put in its graph; eager code inside the block should not use
``out=`` for ops it wants noised. A phase-restricted mode (``phase="rollout"``/``"training"``)
reads a context variable per call, so it refuses to be traced (an error inside dynamo, which then
runs that frame eagerly) rather than fix the phase at trace time; the phase is always honoured.
``ops="all"`` includes "sdpa": fused attention is then computed by the math path (it materializes
the attention matrix, as eager attention does).
"""

from __future__ import annotations

import collections
import itertools
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import ErrorModel, get as get_error, noise_key
from .keys import StepCounter, perturb, perturb_grad, process_rank, process_seed
from .phases import check_phase, phase_active

aten = torch.ops.aten

__all__ = ["ALL_OPS", "DEFAULT_OPS", "GEMM_LIKE", "OPS", "NoisyOps", "noisy_ops", "register_op", "resolve_ops"]

DEFAULT_OPS = ("linear", "matmul", "bmm")

# The registry: op name -> (torch callables routed to it, implementation). One entry per op.
OPS: dict[str, tuple[tuple, object]] = {}


def register_op(name: str, funcs):
    """Register a noisy implementation ``impl(mode, name, func, args, kwargs)`` for ``funcs``."""

    def wrap(impl):
        OPS[name] = (tuple(funcs), impl)
        return impl

    return wrap


def _args(args, kwargs, names, defaults):
    """Bind positional/keyword arguments of a torch call to ``names`` (missing ones from defaults)."""
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


# -- the noise as custom ops ---------------------------------------------------------------------------
# Opaque to torch.compile (one graph node each, no graph break) and run eagerly at run time, so the
# step counters advance when the op runs, not when it is traced. A mode is named by an integer id.
_MODES: dict[int, "NoisyOps"] = {}  # entered modes, and the last RETAINED_EXITED ones that were exited
_EXITED: collections.deque = collections.deque()
_NEXT_ID = itertools.count(1)
# A backward may run after its block was exited (``with noisy_ops(...): loss = f()``, then
# ``loss.backward()``): exited modes stay resolvable until this many others exited after them.
RETAINED_EXITED = 256


def _mode(mode: int) -> "NoisyOps":
    try:
        return _MODES[mode]
    except KeyError:
        raise RuntimeError(
            f"hwnoise: a noisy op's backward ran after {RETAINED_EXITED} other noisy_ops blocks were exited "
            "since its own; run backward within (or soon after) the block that ran the forward"
        ) from None


@torch.library.custom_op("hwnoise::next_step", mutates_args=())
def _next_step(anchors: list[torch.Tensor], mode: int, op: str) -> torch.Tensor:
    """The step of this call of ``op`` (its count so far in the block). ``anchors`` (the operands)
    only make calls on different tensors distinct nodes for the compiler."""
    return torch.tensor(_mode(mode)._steps.next(op), dtype=torch.int64)


@_next_step.register_fake
def _(anchors, mode, op):
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("hwnoise::keyed_noise", mutates_args=())
def _keyed_noise(t: torch.Tensor, step: torch.Tensor, mode: int, op: str, role: str) -> torch.Tensor:
    """``error.apply(t, key(seed, op, role, step))`` for the mode's error and seed."""
    m = _mode(mode)
    out = m.error.apply(t, noise_key(m.key_seed, op, role, int(step)))
    return out.clone() if out is t else out  # a custom op may not return its input


@_keyed_noise.register_fake
def _(t, step, mode, op, role):
    return torch.empty_like(t)


def _straight_through(ctx, grad):
    return grad, None, None, None, None


torch.library.register_autograd("hwnoise::keyed_noise", _straight_through)


class _GradNoise(torch.autograd.Function):
    """Identity forward; backward perturbs the gradient with (op, role, step) of the forward call."""

    @staticmethod
    def forward(ctx, x, step, mode, op, role):
        ctx.save_for_backward(step)
        ctx.mode, ctx.op, ctx.role = mode, op, role
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (step,) = ctx.saved_tensors
        return torch.ops.hwnoise.keyed_noise(grad, step, ctx.mode, ctx.op, ctx.role), None, None, None, None


def _noisy_call(mode: "NoisyOps", name: str, compute, args: list, grad_slots, anchors, summed: int = 2):
    """``compute(*args)`` with a noisy result and noisy gradients for ``args[i]``, role r, for
    ``(i, r)`` in ``grad_slots``. One step per call keys all three draws.

    ``summed``: the length of the dimension(s) the call sums over (the GEMM's K). The noise models
    accumulation error, so a contraction that sums nothing (K = 1: an outer product such as a RoPE
    angle table ``inv_freq @ positions``) is exact on hardware too and runs clean, forward and
    backward, without taking a step (the draws of the real GEMMs do not shift)."""
    if summed <= 1:
        return compute(*args)
    wants_grad = mode.backward and torch.is_grad_enabled() and any(
        isinstance(args[i], torch.Tensor) and args[i].requires_grad for i, _ in grad_slots)
    if not (mode.forward or wants_grad):
        return compute(*args)
    if not torch.compiler.is_compiling():
        # Eager: the step and keys are Python ints and the gradient noise an autograd.Function holding
        # its key, so no tensor is made for the bookkeeping (no host work between a device's GEMMs)
        # and the custom ops' dispatcher round trip is skipped; same counter and keys as the custom ops.
        step = mode._steps.next(name)
        if wants_grad:
            args = list(args)
            for i, role in grad_slots:
                if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                    args[i] = perturb_grad(args[i], mode.error, noise_key(mode.key_seed, name, role, step))
        y = compute(*args)
        if mode.forward:
            y = perturb(y, mode.error, noise_key(mode.key_seed, name, "forward", step))
        return y
    # Traced by torch.compile: the step comes from an op that runs at run time (one CPU scalar per call).
    step = torch.ops.hwnoise.next_step([a for a in anchors if isinstance(a, torch.Tensor)], mode._id, name)
    if wants_grad:
        args = list(args)
        for i, role in grad_slots:
            if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                args[i] = _GradNoise.apply(args[i], step, mode._id, name, role)
    y = compute(*args)
    if mode.forward:
        y = torch.ops.hwnoise.keyed_noise(y, step, mode._id, name, "forward")
    return y


_GEMM_SLOTS = ((0, "grad_input"), (1, "grad_weight"))


def _inner(a) -> int:
    """K of ``a @ b`` (and of linear/mm/bmm/baddbmm): the last dimension of the first operand."""
    return int(a.shape[-1]) if isinstance(a, torch.Tensor) and a.dim() > 0 else 1


def _gemm(mode: "NoisyOps", name: str, compute, a, b, extra=(), summed=None):
    """``compute(a, b, *extra)`` with a noisy result and noisy gradients for ``a`` and ``b``
    (clean when the contraction sums over nothing: ``summed``, default K = ``a.shape[-1]``, is 1)."""
    summed = _inner(a) if summed is None else summed
    return _noisy_call(mode, name, compute, [a, b, *extra], _GEMM_SLOTS, (a, b), summed=summed)


def _pointwise(mode: "NoisyOps", name: str, compute, x, weight=None):
    """``compute(x, weight)`` with a noisy result, a noisy grad_input and (norms) a noisy grad_weight."""
    slots = ((0, "grad_input"), (1, "grad_weight")) if weight is not None else ((0, "grad_input"),)
    return _noisy_call(mode, name, compute, [x, weight], slots, (x, weight))


# The noisy ops compute with aten ops: those pass through the mode untouched, also when a graph
# compiled with backend="eager" replays the traced calls inside the block.
@register_op("linear", (F.linear, torch.addmm, torch.Tensor.addmm))
def _linear(mode, name, func, args, kwargs):
    if func is F.linear:
        a = _args(args, kwargs, ("input", "weight", "bias"), {"bias": None})
        return _gemm(mode, name, aten.linear, a["input"], a["weight"], (a["bias"],))
    # addmm(bias, x, W) = beta * bias + alpha * (x @ W): a linear layer's GEMM (HF Conv1D, GPT-2)
    a = _args(args, kwargs, ("input", "mat1", "mat2"), {"beta": 1, "alpha": 1})
    return _gemm(mode, name, lambda x, w, c: aten.addmm(c, x, w, beta=a["beta"], alpha=a["alpha"]),
                 a["mat1"], a["mat2"], (a["input"],))


def _einsum_operands(args) -> tuple[str, list]:
    """(equation, operands) of ``torch.einsum(eq, *ops)``, ``einsum(eq, [ops])`` or the sublist form."""
    if isinstance(args[0], str):
        operands = args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        return args[0], list(operands)
    # einsum(op1, sublist1, op2, sublist2, ..., [output sublist]); indices 0..51 are a-z, A-Z
    def letters(sub):
        return "".join("..." if i is Ellipsis else chr(ord("a") + i) if i < 26 else chr(ord("A") + i - 26)
                       for i in sub)

    pairs = len(args) // 2
    equation = ",".join(letters(sub) for sub in args[1:2 * pairs:2])
    if len(args) % 2:
        equation += "->" + letters(args[-1])
    return equation, list(args[0:2 * pairs:2])


def _einsum(mode, name, func, args, kwargs):
    """A contraction of two or more operands is a GEMM: noisy result; the first operand's gradient
    is "grad_input", the others' "grad_weight". One operand (a trace, a transpose) passes through."""
    equation, operands = _einsum_operands(args)
    if len(operands) < 2 or not all(isinstance(o, torch.Tensor) for o in operands):
        return func(*args, **kwargs)
    slots = tuple((i, "grad_input" if i == 0 else "grad_weight") for i in range(len(operands)))
    return _noisy_call(mode, name, lambda *ops: aten.einsum(equation, list(ops)), operands, slots, operands,
                       summed=_einsum_summed(equation, operands))


def _einsum_summed(equation: str, operands) -> int:
    """The number of products each output element of ``einsum(equation, *operands)`` sums: the
    product of the sizes of the indices that appear in an input but not in the output (1 for an
    outer product such as ``"i,j->ij"``, the RoPE table of vLLM). Ellipsis dimensions are summed
    only when the output leaves them out."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    sizes: dict[str, int] = {}
    ellipsis = 1
    for term, operand in zip(terms, operands):
        letters = term.replace("...", "")
        if "..." in term:
            before = term.index("...")
            n_ell = operand.dim() - len(letters)
            dims = list(operand.shape)
            ell_dims = dims[before:before + n_ell]
            dims = dims[:before] + dims[before + n_ell:]
            ellipsis = max(ellipsis, math.prod(int(d) for d in ell_dims))
        else:
            dims = list(operand.shape)
        for letter, size in zip(letters, dims):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    if not arrow:  # implicit output: the indices that appear once, in alphabetical order
        counts = collections.Counter("".join(t.replace("...", "") for t in terms))
        output = "..." + "".join(sorted(k for k, v in counts.items() if v == 1))
    summed = math.prod(size for letter, size in sizes.items() if letter not in output)
    if "..." in inputs and "..." not in output:
        summed *= ellipsis
    return summed


@register_op("matmul", (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
                        torch.linalg.matmul, torch.mm, torch.Tensor.mm, torch.einsum))
def _matmul(mode, name, func, args, kwargs):
    if func is torch.einsum:
        return _einsum(mode, name, func, args, kwargs)
    if func in (torch.mm, torch.Tensor.mm):
        a = _args(args, kwargs, ("input", "mat2"), {})
        return _gemm(mode, name, aten.mm, a["input"], a["mat2"])
    a = _args(args, kwargs, ("input", "other"), {})
    left, right = a["input"], a["other"]
    if func is torch.Tensor.__rmatmul__:  # b.__rmatmul__(a) is a @ b
        left, right = right, left
    if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
        return func(*args, **kwargs)
    return _gemm(mode, name, aten.matmul, left, right)


@register_op("bmm", (torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm,
                     torch.Tensor.addbmm))
def _bmm(mode, name, func, args, kwargs):
    if func in (torch.bmm, torch.Tensor.bmm):
        a = _args(args, kwargs, ("input", "mat2"), {})
        return _gemm(mode, name, aten.bmm, a["input"], a["mat2"])
    # baddbmm / addbmm: beta * input + alpha * (batch1 @ batch2), summed over the batch for addbmm
    a = _args(args, kwargs, ("input", "batch1", "batch2"), {"beta": 1, "alpha": 1})
    op = aten.baddbmm if func in (torch.baddbmm, torch.Tensor.baddbmm) else aten.addbmm
    b1 = a["batch1"]
    # addbmm also sums over the batch: K is batches x inner
    summed = _inner(b1) * (int(b1.shape[0]) if op is aten.addbmm and b1.dim() == 3 else 1)
    return _gemm(mode, name, lambda b1, b2, c: op(c, b1, b2, beta=a["beta"], alpha=a["alpha"]),
                 a["batch1"], a["batch2"], (a["input"],), summed=summed)


@register_op("softmax", (F.softmax, torch.softmax, torch.Tensor.softmax))
def _softmax(mode, name, func, args, kwargs):
    # F.softmax(input, dim, _stacklevel, dtype); torch.softmax / Tensor.softmax(input, dim, dtype)
    names = ("input", "dim", "_stacklevel", "dtype") if func is F.softmax else ("input", "dim", "dtype")
    a = _args(args, kwargs, names, {"dim": None, "dtype": None})
    dim = a["dim"]
    if dim is None:  # the legacy implicit dim of F.softmax
        dim = F._get_softmax_dim("softmax", a["input"].dim(), 3)
    dtype = a["dtype"]
    return _pointwise(mode, name, lambda x, _: aten.softmax.int(x, dim, dtype), a["input"])


@register_op("silu", (F.silu,))
def _silu(mode, name, func, args, kwargs):
    # inplace=True is computed out of place: a noisy result is a new tensor (callers use the return)
    a = _args(args, kwargs, ("input", "inplace"), {"inplace": False})
    return _pointwise(mode, name, lambda x, _: aten.silu(x), a["input"])


@register_op("gelu", (F.gelu,))
def _gelu(mode, name, func, args, kwargs):
    a = _args(args, kwargs, ("input", "approximate"), {"approximate": "none"})
    return _pointwise(mode, name, lambda x, _: aten.gelu(x, approximate=a["approximate"]), a["input"])


@register_op("layer_norm", (F.layer_norm, torch.layer_norm))
def _layer_norm(mode, name, func, args, kwargs):
    a = _args(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
              {"weight": None, "bias": None, "eps": 1e-5})
    shape = list(a["normalized_shape"])
    return _pointwise(mode, name, lambda x, w: aten.layer_norm(x, shape, w, a["bias"], a["eps"]), a["input"],
                      a["weight"])


@register_op("rms_norm", (F.rms_norm, torch.rms_norm))
def _rms_norm(mode, name, func, args, kwargs):
    a = _args(args, kwargs, ("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})
    shape = list(a["normalized_shape"])
    return _pointwise(mode, name, lambda x, w: aten.rms_norm(x, shape, w, a["eps"]), a["input"], a["weight"])


@register_op("sdpa", (F.scaled_dot_product_attention,))
def _sdpa(mode, name, func, args, kwargs):
    """Fused attention run as noisy matmul -> softmax -> matmul (the math reference of SDPA)."""
    a = _args(args, kwargs, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
              {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    if a["dropout_p"]:
        raise ValueError("noisy sdpa does not support dropout_p > 0; use eval mode or ops without 'sdpa'")
    q, k, v = a["query"], a["key"], a["value"]
    if a["enable_gqa"] and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = _gemm(mode, "matmul", aten.matmul, q * scale, k.transpose(-2, -1))
    length, source = q.shape[-2], k.shape[-2]
    if a["is_causal"]:
        causal = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    mask = a["attn_mask"]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = _pointwise(mode, "softmax", lambda x, _: aten.softmax.int(x, -1), scores)
    return _gemm(mode, "matmul", aten.matmul, probs, v)


ALL_OPS = tuple(OPS)

# Torch calls that are (or contain) a matrix product, for the audit's "unnoised_gemms".
GEMM_LIKE = frozenset({
    "linear", "bilinear", "matmul", "mm", "addmm", "bmm", "baddbmm", "addbmm", "einsum", "mv",
    "addmv", "dot", "vdot", "inner", "outer", "ger", "addr", "tensordot", "chain_matmul", "multi_dot", "rmatmul", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "scaled_dot_product_attention", "scaled_mm", "sparse_mm",
})
_MODULES = {"torch._C._nn": "torch.nn.functional", "torch._C._linalg": "torch.linalg", "torch.functional": "torch",
            "torch._C._VariableFunctions": "torch", None: "torch"}


def _call_name(func) -> str:
    """A readable name of a torch callable: ``torch.mm``, ``Tensor.mm``, ``torch.nn.functional.linear``."""
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if qualname.endswith(".__get__") and hasattr(getattr(func, "__self__", None), "__name__"):
        return f"Tensor.{func.__self__.__name__}"  # a property such as Tensor.shape
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + qualname.split(".", 1)[1]
    if qualname.startswith("_VariableFunctionsClass."):
        return "torch." + qualname.split(".", 1)[1]
    module = _MODULES.get(getattr(func, "__module__", None), getattr(func, "__module__", None))
    if module == "torch.linalg" and qualname.startswith("linalg_"):
        qualname = qualname[len("linalg_"):]
    return f"{module}.{qualname}"


def resolve_ops(ops) -> tuple[str, ...]:
    """An op list (``"all"``, ``"linear,matmul"`` or a sequence of op names) as op names, each once:
    the one parser of op lists (``@ops[...]`` in emulation specs, ``HWNOISE_OPS``, ``noisy_ops(ops=)``)."""
    if isinstance(ops, str):
        ops = ALL_OPS if ops.strip() == "all" else tuple(o.strip() for o in ops.split(",") if o.strip())
    try:
        ops = tuple(ops)
    except TypeError:
        raise ValueError(f"bad ops {ops!r}; expected 'all' or a sequence of: {', '.join(ALL_OPS)}") from None
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        raise ValueError(f"unknown op {unknown[0] if unknown else ops!r}; known: {', '.join(ALL_OPS)} (or 'all')")
    return tuple(dict.fromkeys(ops))


class NoisyOps(TorchFunctionMode):
    """The mode ``noisy_ops`` returns: a context manager; ``stats()`` gives calls per op."""

    def __init__(self, error, ops=DEFAULT_OPS, forward=True, backward=True, seed=0, phase="both", audit=False,
                 rank=None, replica=-1):
        super().__init__()
        if not isinstance(audit, bool):
            raise ValueError(f"audit must be True or False; got {audit!r}")
        if not isinstance(error, ErrorModel):
            error = get_error(error)  # a name alone has no scale: get explains what is missing
        for flag, value in (("forward", forward), ("backward", backward)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False; got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        self.error = error
        self.ops = resolve_ops(ops)
        self.forward = forward
        self.backward = backward
        self.seed = seed
        self.phase = check_phase(phase)
        self._table = {func: (name, OPS[name][1]) for name in self.ops for func in OPS[name][0]}
        self._steps = StepCounter()
        self._passed: collections.Counter | None = collections.Counter() if audit else None
        self._id = next(_NEXT_ID)
        for what, value, none_ok in (("rank", rank, True), ("replica", replica, True)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1
                                      or (what == "rank" and value < 0)):
                raise ValueError(f"{what} must be an integer >= 0 (or None: this process's); got {value!r}")
        self.rank, self.replica = rank, replica
        self._key_seed: int | None = None

    @property
    def key_seed(self) -> int:
        """The seed the draws are keyed with: ``process_seed(seed, rank, replica)`` (``hwnoise.inject.keys``).

        Resolved at the first draw, not at construction: a vLLM worker learns its rank when it
        initializes torch.distributed, after the plugin switched the noise on. Cached once the rank
        is settled (given, torch.distributed initialized, or RANK/LOCAL_RANK set)."""
        if self._key_seed is not None:
            return self._key_seed
        rank, settled = (self.rank, True) if self.rank is not None else process_rank()
        value = process_seed(self.seed, rank=rank, replica=self.replica)
        if settled:
            self._key_seed = value
        return value

    def __repr__(self):
        return (f"noisy_ops({self.error!r}, ops={self.ops!r}, forward={self.forward}, backward={self.backward}, "
                f"seed={self.seed}, phase={self.phase!r})")

    def _activate(self):
        """Start a scope: counters from step 0, the id resolvable by the custom ops."""
        self._steps.reset()  # a fresh scope replays from step 0
        if self._passed is not None:
            self._passed.clear()
        _MODES[self._id] = self
        if self._id in _EXITED:
            _EXITED.remove(self._id)

    def _retire(self):
        """End a scope: the id stays resolvable for late backwards until RETAINED_EXITED others ended."""
        _EXITED.append(self._id)
        while len(_EXITED) > RETAINED_EXITED:
            _MODES.pop(_EXITED.popleft(), None)

    def __enter__(self):
        self._activate()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            return super().__exit__(exc_type, exc_value, traceback)
        finally:
            self._retire()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = self._table.get(func)
        # Calls with out= pass through: compiled code runs its own GEMM kernels that way
        # (extern_kernels.bmm(..., out=buf)) after the noise was put in its graph.
        if entry is None or kwargs.get("out") is not None:
            if self._passed is not None:
                self._passed[_call_name(func)] += 1
            return func(*args, **kwargs)
        if self.phase != "both":
            if torch.compiler.is_compiling():
                raise RuntimeError(f"noisy_ops(phase={self.phase!r}) cannot run under torch.compile (the phase "
                                   "is read per call); compile outside the phase-restricted block or use phase='both'")
            if not phase_active(self.phase):
                return func(*args, **kwargs)
        name, impl = entry
        return impl(self, name, func, args, kwargs)

    def stats(self) -> dict[str, int]:
        """Noisy calls per op name in the current (or last) block."""
        return self._steps.counts()

    def audit(self) -> dict[str, dict[str, int]]:
        """What the block noised and what it let through (needs ``noisy_ops(..., audit=True)``).

        ``noised``: noisy calls per op (``stats()``); ``passed``: every other torch call by name
        (``torch.conv2d``, ``Tensor.view``...); ``unnoised_gemms``: the GEMM-like ones among them
        (a GEMM form of an op not in ``ops``, a convolution, ``tensordot``, fused attention without
        "sdpa", a call with ``out=``). GEMMs inside custom kernels make no torch call: not seen here.
        """
        if self._passed is None:
            raise RuntimeError("audit() needs noisy_ops(..., audit=True); stats() gives the noisy calls")
        passed = dict(self._passed)
        gemms = {k: v for k, v in passed.items() if k.rsplit(".", 1)[-1].strip("_") in GEMM_LIKE}
        return {"noised": self.stats(), "passed": passed, "unnoised_gemms": gemms}


def noisy_ops(error, ops=DEFAULT_OPS, forward: bool = True, backward: bool = True, seed: int = 0,
              phase: str = "both", audit: bool = False, rank: int | None = None, replica: int | None = -1) -> NoisyOps:
    """Scoped operator-level noise: ``with noisy_ops(RelativeGaussian(0.05)): loss.backward()``.

    error: an error model (``hwnoise.errors``). ops: names from ``ALL_OPS`` or ``"all"``.
    forward / backward: noise on results / on the grad_input and grad_weight GEMMs.
    seed: keys every draw with the op name, role and call count. phase: "both", "rollout", "training".
    audit: also count every torch call that passed through clean (``mode.audit()``).
    rank / replica: whose draws these are (default: this process's, ``hwnoise.inject.keys.process_seed``):
    rank 0 without a replica keys with ``seed`` itself, every other rank and replica with its own seed.
    """
    return NoisyOps(error, ops=ops, forward=forward, backward=backward, seed=seed, phase=phase, audit=audit,
                    rank=rank, replica=replica)
