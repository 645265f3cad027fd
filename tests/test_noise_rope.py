"""Operator noise models GEMM accumulation: contractions that sum over nothing pass clean (issue 23, 1).

Before: every two-operand contraction was noised, outer products included, so the RoPE angle table
(transformers 5.x ``inv_freq_expanded.float() @ position_ids_expanded.float()``, inner dim 1; vLLM
``torch.einsum("i,j -> ij", t, inv_freq)``) was scrambled under ``relative:0.05@ops``. Now a call
whose summed length K is 1 runs clean and takes no step; K = 2 is still noised (the too-far check).
The real transformers 5.10 and vLLM rotary code is exercised in tests/verl/test_rope_on_cpu.py
(the verl environment has those versions).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hwnoise as hn
from hwnoise.errors import RelativeGaussian

REL = RelativeGaussian(0.05)


def _t(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + 2.0  # away from 0


# name: call(k) -> result, for a contraction with summed length k (k = 1: an outer product)
FORMS = {
    "F.linear": lambda k: F.linear(_t(4, k, seed=0), _t(3, k, seed=1), _t(3, seed=2)),
    "torch.addmm": lambda k: torch.addmm(_t(4, 3, seed=2), _t(4, k, seed=0), _t(k, 3, seed=1)),
    "Tensor.addmm": lambda k: _t(4, 3, seed=2).addmm(_t(4, k, seed=0), _t(k, 3, seed=1)),
    "torch.matmul": lambda k: torch.matmul(_t(2, 4, k, seed=0), _t(2, k, 3, seed=1)),
    "Tensor.matmul": lambda k: _t(2, 4, k, seed=0).matmul(_t(2, k, 3, seed=1)),
    "@": lambda k: _t(2, 4, k, seed=0) @ _t(2, k, 3, seed=1),
    "@ 1-D right": lambda k: _t(4, k, seed=0) @ _t(k, seed=1),
    "torch.linalg.matmul": lambda k: torch.linalg.matmul(_t(4, k, seed=0), _t(k, 3, seed=1)),
    "torch.mm": lambda k: torch.mm(_t(4, k, seed=0), _t(k, 3, seed=1)),
    "Tensor.mm": lambda k: _t(4, k, seed=0).mm(_t(k, 3, seed=1)),
    "torch.bmm": lambda k: torch.bmm(_t(2, 4, k, seed=0), _t(2, k, 3, seed=1)),
    "Tensor.bmm": lambda k: _t(2, 4, k, seed=0).bmm(_t(2, k, 3, seed=1)),
    "torch.baddbmm": lambda k: torch.baddbmm(_t(2, 4, 3, seed=2), _t(2, 4, k, seed=0), _t(2, k, 3, seed=1)),
    "Tensor.baddbmm": lambda k: _t(2, 4, 3, seed=2).baddbmm(_t(2, 4, k, seed=0), _t(2, k, 3, seed=1)),
    # addbmm sums over the batch as well: one batch of inner length k
    "torch.addbmm": lambda k: torch.addbmm(_t(4, 3, seed=2), _t(1, 4, k, seed=0), _t(1, k, 3, seed=1)),
    "einsum i,j->ij (vLLM RoPE)": lambda k: torch.einsum("i,j -> ij", _t(5, seed=0), _t(3, seed=1))
    if k == 1 else torch.einsum("ik,jk->ij", _t(5, k, seed=0), _t(3, k, seed=1)),
    "einsum ij,jk->ik": lambda k: torch.einsum("ij,jk->ik", _t(4, k, seed=0), _t(k, 3, seed=1)),
    "einsum implicit": lambda k: torch.einsum("ij,jk", _t(4, k, seed=0), _t(k, 3, seed=1)),
    "einsum list": lambda k: torch.einsum("bij,bjk->bik", [_t(2, 4, k, seed=0), _t(2, k, 3, seed=1)]),
    "einsum sublist": lambda k: torch.einsum(_t(4, k, seed=0), [0, 1], _t(k, 3, seed=1), [1, 2], [0, 2]),
    "einsum ellipsis": lambda k: torch.einsum("...ij,...jk->...ik", _t(2, 4, k, seed=0), _t(2, k, 3, seed=1)),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_a_contraction_that_sums_nothing_passes_clean(form):
    clean = FORMS[form](1)
    with hn.noisy_ops(REL, ops="all", seed=3) as mode:
        noisy = FORMS[form](1)
    assert torch.equal(noisy, clean), f"{form} with K=1 was noised"
    assert mode.stats() == {}, f"{form} with K=1 took a step: {mode.stats()}"


@pytest.mark.parametrize("form", list(FORMS))
def test_a_contraction_that_sums_two_products_is_still_noised(form):
    clean = FORMS[form](2)
    with hn.noisy_ops(REL, ops="all", seed=3) as mode:
        noisy = FORMS[form](2)
    assert not torch.equal(noisy, clean), f"{form} with K=2 ran clean"
    assert sum(mode.stats().values()) == 1


def test_addbmm_over_two_batches_of_inner_one_is_an_accumulation():
    args = (_t(4, 3, seed=2), _t(2, 4, 1, seed=0), _t(2, 1, 3, seed=1))
    clean = torch.addbmm(*args)
    with hn.noisy_ops(REL, ops="all", seed=3):
        assert not torch.equal(torch.addbmm(*args), clean)


def test_an_outer_product_does_not_shift_the_draws_of_the_real_gemms():
    x, w = _t(4, 8, seed=0), _t(6, 8, seed=1)
    with hn.noisy_ops(REL, seed=3):
        alone = F.linear(x, w)
    with hn.noisy_ops(REL, seed=3):
        _ = _t(5, 1, seed=4) @ _t(1, 7, seed=5)  # a RoPE table first
        after = F.linear(x, w)
    assert torch.equal(alone, after)


def test_the_transformers_5_10_rope_expression_is_exact():
    """The angle table as transformers 5.9/5.10 compute it (Qwen2.5-1.5B's theta and head_dim):
    with K = 1 before the fix, 18 % of angles up to 1024 moved by > 1 rad."""
    head_dim, theta = 128, 1_000_000.0
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    position_ids = torch.arange(1024)[None]
    inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    position_ids_expanded = position_ids[:, None, :].float()
    clean = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
    with hn.noisy_ops(REL, seed=0):
        noisy = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
    assert torch.equal(noisy, clean)
    reference = position_ids[0, :, None].double() * inv_freq.double()[None, :]  # independent: elementwise
    assert torch.allclose(clean[0].double(), reference, rtol=1e-6)


def test_qwen2_rotary_embedding_is_bit_equal_under_noise():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    config = Qwen2Config(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, rope_theta=1_000_000.0,
                         max_position_embeddings=4096)
    rope = Qwen2RotaryEmbedding(config)
    x, positions = torch.zeros(1, 1), torch.arange(1024)[None]
    clean = rope(x, positions)
    with hn.noisy_ops(REL, ops="all", seed=0):
        noisy = rope(x, positions)
    assert all(torch.equal(a, b) for a, b in zip(noisy, clean))


@pytest.fixture(scope="module")
def bundled():
    from hwnoise.models import load

    model, tok = load("default")
    return model.eval(), tok


@pytest.mark.slow
def test_bundled_model_rope_is_clean_and_every_linear_is_noised(bundled, one_thread):
    model, tok = bundled
    ids = tok(["The quick brown fox jumps over the lazy dog. " * 3], return_tensors="pt").input_ids
    rotary = [m for n, m in model.named_modules() if n.endswith("rotary_emb")]
    assert rotary, "the bundled model has no rotary_emb module"
    tables, linears = {}, {}

    def rope_hook(name):
        def hook(module, args, out):
            tables.setdefault(name, []).append(tuple(t.detach().clone() for t in out))
        return hook

    def linear_hook(name):
        def hook(module, args, out):
            # the clean GEMM of the very input this call got (aten passes through the mode)
            clean = torch.ops.aten.linear(args[0], module.weight, module.bias)
            linears[name] = (out.detach().clone(), clean.detach())
        return hook

    handles = [m.register_forward_hook(rope_hook(n)) for n, m in model.named_modules() if n.endswith("rotary_emb")]
    handles += [m.register_forward_hook(linear_hook(n)) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(ids)
            clean_tables = {k: v[-1] for k, v in tables.items()}
            with hn.noisy_ops(REL, ops=("linear", "matmul", "bmm"), seed=1):
                model(ids)
    finally:
        for h in handles:
            h.remove()
    for name, (cos, sin) in clean_tables.items():
        ncos, nsin = tables[name][-1]
        assert torch.equal(ncos, cos) and torch.equal(nsin, sin), f"{name}: RoPE table changed under noise"
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(linears) == n_linear
    unnoised = [n for n, (out, clean) in linears.items() if torch.equal(out, clean)]
    assert not unnoised, f"linear layers computed clean under operator noise: {unnoised[:5]}"
