"""Tests of hwnoise.integrations.verl: run in .venv-verl (verl 0.9.x), `make test-verl`.

Named `test_*_on_cpu.py` as verl's own CPU tests are. The main suite does not collect this
directory (tests/conftest.py), since the main environment has no verl.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def tiny_llama(dtype=None, layers=3, hidden=256):
    """A random tiny Llama (RMSNorm weights at 1.0, as a fresh model has them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    return model.to(dtype) if dtype is not None else model
