"""A tiny Llama for the verl tests (a module of its own: two test folders' conftest.py files share
the module name ``conftest`` when pytest collects both, so nothing imports from a conftest)."""

import torch


def tiny_llama(dtype=None, layers=3, hidden=256):
    """A random tiny Llama (RMSNorm weights at 1.0, as a fresh model has them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    return model.to(dtype) if dtype is not None else model
