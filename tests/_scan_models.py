"""A tiny Llama and a byte-level stand-in tokenizer for the scan tests (offline, built in the test)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hwnoise as hn

VOCAB = 300


class ByteTokenizer:
    """Maps text to ids: 1 (BOS) then 2 + each UTF-8 byte. Enough for ``tokenizer(text)["input_ids"]``."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str):
        return {"input_ids": [1] + [2 + b for b in text.encode("utf-8")]}


def tiny_llama(hidden: int = 64, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread the weights a little so that modules differ in sensitivity
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(1 + 3 * i)
    return model.eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bit_identical(model, snap) -> bool:
    state = model.state_dict()
    return set(state) == set(snap) and all(
        v.dtype == snap[k].dtype and torch.equal(v.view(torch.int32), snap[k].view(torch.int32))
        for k, v in state.items())


def trained_tiny_llama(tokenizer, texts, steps: int = 80, seed: int = 0):
    """The tiny Llama fitted for a few steps to ``texts``, so that quantization noise raises its loss
    (a random model's loss moves either way)."""
    from hwnoise.scan.calibration import tokenize

    model = tiny_llama(seed=seed)
    batch = tokenize(tokenizer, texts, 32)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        opt.step()
    return model.eval()


# Independent re-measurement of an end-to-end effect: two plain full forwards, no caching.


def independent_effect(model, batch, change) -> tuple[float, float]:
    """(loss increase, mean KL) from two full forwards, the change applied by ``change()``
    (a context manager); no caching of any kind."""
    valid = batch.attention_mask[:, 1:].bool()
    targets = batch.input_ids[:, 1:][valid]

    def logp():
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return torch.log_softmax(logits[:, :-1][valid].double(), -1)

    clean = logp()
    with change():
        changed = logp()
    loss = F.nll_loss(changed, targets).item() - F.nll_loss(clean, targets).item()
    kl = (clean.exp() * (clean - changed)).sum(-1).mean().item()
    return loss, kl


class InPlace:
    """Quantize a weight in place and restore it (the naive way the scan avoids)."""

    def __init__(self, module, fmt):
        self.module, self.fmt = module, fmt

    def __enter__(self):
        self.saved = self.module.weight.detach().clone()
        with torch.no_grad():
            self.module.weight.copy_(hn.quantize(self.saved, self.fmt))

    def __exit__(self, *exc):
        with torch.no_grad():
            self.module.weight.copy_(self.saved)
