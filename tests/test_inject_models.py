"""Tiny models and helpers shared by the injection tests (holds no tests itself)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(layers: int = 2, attn: str = "eager", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=32)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def tokens(batch: int = 2, length: int = 12, seed: int = 0):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


class MatmulNet(nn.Module):
    """Every GEMM kind: F.linear (3-D input), `@` on a parameter, torch.matmul and torch.bmm."""

    def __init__(self, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(width, width)
        self.w = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.out = nn.Linear(width, 4, bias=False)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = h @ self.w  # the @ operator
        scores = torch.bmm(h, h.transpose(1, 2)) / 4  # (B, T, T)
        h = torch.matmul(torch.softmax(scores, -1), h)
        return self.out(h)


class AtOnlyNet(nn.Module):
    """A model whose only GEMM is written with `@`."""

    def __init__(self, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x):
        return (x @ self.w).tanh() @ self.w.t()


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bit_identical(a: dict, b: dict) -> bool:
    """Same keys, dtypes and bits (NaN-safe: compares the bytes)."""
    def raw(t):
        return t.detach().reshape(-1).contiguous().view(torch.uint8)

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(raw(a[k]), raw(b[k])) for k in a)
