"""The calibration batch and the forward passes a scan repeats: tokenized once, one clean forward
cached, then one cheap forward per module with only that module changed.

Cheap because the decoder layers before the changed module are not recomputed: during the clean
pass each decoder layer's output is cached, and during a module's pass the layers that run before
it return their cached output instead of computing it (they see exactly the clean input, so their
output is bit-identical to the cached one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Calibration", "CleanPass", "DEFAULT_MAX_LENGTH", "decoder_layers", "tokenize"]

DEFAULT_MAX_LENGTH = 16  # tokens per text: 211 single-module passes of 8 texts stay under a minute on 2 cores (32: ~82 s)
_LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)$")


@dataclass
class Calibration:
    """Right-padded token ids and mask (B, T); ``targets``/``valid`` for next-token prediction (B, T-1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        # Position t predicts token t+1: valid when both are real tokens (right padding).
        return self.attention_mask[:, 1:].bool() & self.attention_mask[:, :-1].bool()

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def predictions(self) -> int:
        return int(self.valid.sum())


def tokenize(tokenizer, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, device="cpu") -> Calibration:
    """Tokenize each text (truncated to ``max_length`` tokens) and right-pad into one batch.

    Only ``tokenizer(text)["input_ids"]`` is used, so any HF tokenizer or a stand-in works; texts
    shorter than two tokens carry no next-token prediction and are an error."""
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(f"a scan needs the model's tokenizer (text -> {{'input_ids': ...}}); got {tokenizer!r}. "
                         "hwnoise.models.load(...) returns (model, tokenizer) together")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (tokens per text); got {max_length!r}")
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and isinstance(ids[0], list):  # a batch of one
            ids = ids[0]
        rows.append(ids[:max_length])
    short = [i for i, r in enumerate(rows) if len(r) < 2]
    if short:
        raise ValueError(f"calibration texts {short} tokenize to fewer than 2 tokens; give longer texts")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return Calibration(input_ids.to(device), mask.to(device))


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder-layer index -> module, for modules named like ``model.layers.14`` (or ``h.14``)."""
    out = {}
    for name, module in model.named_modules():
        found = _LAYER_NAME.search(name)
        if found and int(found.group(1)) not in out:
            out[int(found.group(1))] = module
    return dict(sorted(out.items()))


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


class CleanPass:
    """One clean forward over the calibration batch, cached: the next-token log-probabilities at
    valid positions, the clean loss, each decoder layer's output, and the call order of modules.

    ``effect()`` then runs one forward with a change in place and returns (loss increase, mean KL
    of clean || changed next-token distributions) over the valid positions.
    """

    def __init__(self, model: nn.Module, calibration: Calibration, watch: dict[str, nn.Module] | None = None,
                 capture_inputs: bool = False, capture_outputs: bool = False):
        self.model = model
        self.calibration = calibration
        self.layers = decoder_layers(model)
        self.layer_outputs: dict[int, object] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._order: dict[str, int] = {}
        watch = watch or {}
        calls = [0]
        handles = []

        def layer_hook(index):
            def hook(module, args, output):
                self.layer_outputs.setdefault(index, output)
                calls[0] += 1
                self._order.setdefault(f"#layer{index}", calls[0])
            return hook

        def module_hook(name):
            def hook(module, args):
                calls[0] += 1
                self._order.setdefault(name, calls[0])
                if capture_inputs and name not in self.inputs and args and isinstance(args[0], torch.Tensor):
                    self.inputs[name] = args[0].detach()
            return hook

        def output_hook(name):
            def hook(module, args, output):
                if name not in self.outputs and isinstance(output, torch.Tensor):
                    self.outputs[name] = output.detach()
            return hook

        try:
            for index, layer in self.layers.items():
                handles.append(layer.register_forward_hook(layer_hook(index)))
            for name, module in watch.items():
                handles.append(module.register_forward_pre_hook(module_hook(name)))
                if capture_outputs:
                    handles.append(module.register_forward_hook(output_hook(name)))
            logits = self._forward()
        finally:
            for h in handles:
                h.remove()
        self.valid = calibration.valid
        self.count = int(self.valid.sum())
        with torch.inference_mode():
            logits = logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            mask = self.valid[..., None]
            self.clean_logits = logits
            self.clean_p = logp.exp() * mask  # zero at padding
            self.clean_p_sum = torch.where(self.valid, self.clean_p.sum(-1), torch.ones_like(logits[..., 0]))
            self.targets = calibration.targets
            self.clean_loss = self._mean(-logp.gather(-1, self.targets[..., None])[..., 0])
        self._last_layer_call = max((v for k, v in self._order.items() if k.startswith("#layer")), default=0)

    def _forward(self) -> torch.Tensor:
        c = self.calibration
        with torch.inference_mode():
            out = _logits(self.model(input_ids=c.input_ids, attention_mask=c.attention_mask, use_cache=False))
            return out.to(c.input_ids.device)  # a no-op unless a device map put lm_head elsewhere

    def skippable_layers(self, name: str, layer: int | None) -> list[int]:
        """Decoder layers that run before module ``name`` and so may return their cached output."""
        if layer is not None:
            return [i for i in self.layers if i < layer]
        order = self._order.get(name)
        if order is not None and order > self._last_layer_call:
            return list(self.layers)  # runs after every decoder layer (lm_head, the final norm)
        return []

    @contextmanager
    def _cached_layers(self, indices: list[int]):
        saved = {}
        try:
            for i in indices:
                layer = self.layers[i]
                saved[i] = layer.__dict__.get("forward")
                cached = self.layer_outputs[i]
                layer.forward = lambda *args, _cached=cached, **kwargs: _cached
            yield
        finally:
            for i, previous in saved.items():
                layer = self.layers[i]
                if previous is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = previous

    def effect(self, name: str, layer: int | None, change: Callable[[], object]) -> tuple[float, float]:
        """(loss increase, mean KL) with ``change`` active: a context-manager factory that puts the
        change in place and removes it on exit (also on errors)."""
        with self._cached_layers(self.skippable_layers(name, layer)), change():
            logits = self._forward()
        with torch.inference_mode():
            # Everything from d = changed - clean logits, which is small where the change is small:
            # log-probabilities near -10 carry fp32 rounding of ~1e-6 each, as large as a small KL.
            # lse(changed) - lse(clean) = log sum_v p_v e^{d_v} (p: clean probabilities, renormalized),
            # KL(clean || changed) = that - sum_v p_v d_v, loss increase = that - d_target.
            d = logits[:, :-1].float() - self.clean_logits
            top = d.amax(-1, keepdim=True)
            shift = top[..., 0] + torch.log((self.clean_p * torch.exp(d - top)).sum(-1) / self.clean_p_sum)
            kl = self._mean(shift - (self.clean_p * d).sum(-1) / self.clean_p_sum)
            loss = self._mean(shift - d.gather(-1, self.targets[..., None])[..., 0])
        return loss, max(kl, 0.0)

    def _mean(self, per_position: torch.Tensor) -> float:
        return float(per_position.double()[self.valid].sum() / self.count)
