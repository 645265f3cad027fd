"""Operator noise leaves RoPE tables exact in the code verl really runs (issue 23, 1).

The verl environment holds transformers 5.10 (verl's pin), whose ``Qwen2RotaryEmbedding`` and
``LlamaRotaryEmbedding`` compute ``inv_freq_expanded.float() @ position_ids_expanded.float()``
(inner dimension 1) at every forward, and vLLM, whose ``RotaryEmbedding`` builds its cos/sin cache
with ``torch.einsum("i,j -> ij", t, inv_freq)`` at model build, after verl's plugin switched the
noise on. Before the fix both were scrambled (18 % of angles up to 1024 off by > 1 rad with
Qwen2.5-1.5B's theta); now they are bit-equal to clean while a linear layer is still noised.
"""

import pytest
import torch
import torch.nn.functional as F

import hwnoise as hn
from hwnoise.errors import RelativeGaussian

REL = RelativeGaussian(0.05)


def qwen25_config(cls):
    # Qwen2.5-1.5B's geometry: head_dim 128, rope_theta 1e6
    return cls(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, rope_theta=1_000_000.0,
               max_position_embeddings=32768, intermediate_size=8960, num_hidden_layers=2, vocab_size=64)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_transformers_rotary_tables_are_bit_equal_under_operator_noise(arch):
    import transformers

    if arch == "qwen2":
        from transformers import Qwen2Config as Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rotary
    else:
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary
    import inspect

    # the premise: this transformers computes the table as a K = 1 matmul (what used to be noised)
    assert "inv_freq_expanded.float() @ position_ids_expanded.float()" in inspect.getsource(Rotary.forward), \
        transformers.__version__
    rope = Rotary(qwen25_config(Config))
    x, positions = torch.zeros(1, 1), torch.arange(1024)[None]
    clean = rope(x, positions)
    with hn.noisy_ops(REL, seed=0) as mode:
        noisy = rope(x, positions)
        linear = F.linear(torch.randn(4, 64), torch.randn(8, 64))
    assert all(torch.equal(a, b) for a, b in zip(noisy, clean))
    assert mode.stats() == {"linear": 1}  # the linear call was noised, the table's matmul was not


def test_vllm_rotary_cache_is_bit_equal_under_operator_noise():
    pytest.importorskip("vllm")
    import inspect

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding, RotaryEmbeddingBase

    assert 'torch.einsum("i,j -> ij", t, inv_freq)' in inspect.getsource(RotaryEmbeddingBase._compute_cos_sin_cache)

    def cache():
        with set_current_vllm_config(VllmConfig()):
            return RotaryEmbedding(128, 128, 4096, 1_000_000.0, True, torch.float32).cos_sin_cache

    clean = cache()
    with hn.noisy_ops(REL, seed=0):
        noisy = cache()
        x, w = torch.randn(4, 64), torch.randn(8, 64)
        assert not torch.equal(F.linear(x, w), x @ w.T)  # the too-far check: GEMMs still noised
    assert torch.equal(noisy, clean)
