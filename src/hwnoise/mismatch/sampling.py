"""Sampling completions under a rollout emulation and scoring the same tokens on both sides.

The batch a setting is scored on (``SampleBatch``) is right-padded: each row holds its prompt, then
its completion (up to and including the first EOS), then padding. Position ``t`` predicts token
``t + 1``; only positions predicting a completion token are scored (``valid``), so a
``SampleBatch`` is also a ``hwnoise.scan.calibration.Calibration`` whose loss and KL cover the
completions alone (the scan's end-to-end machinery runs on it unchanged).

Both sides are scored by the same teacher-forced forward on the same tensors (``score_pair``): the
rollout side with the rollout emulation applied, the training side with the training emulation
(or none). When both emulations are the same, the two forwards are the same computation and the
difference is exactly 0. The sampler's own log-probabilities (``Samples.sampler_logp``, the logits
``generate`` used to draw each token, with a KV cache and another batch shape) are kept as well:
they add the engine's numerics to the mismatch, as a vLLM rollout does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..devices import input_device
from ..emulation import Emulation
from ..eval.generate import Prompt, eos_token_ids, pad_token_id
from ..scan.calibration import Calibration

__all__ = ["SampleBatch", "Samples", "WeightsChanged", "sample", "score_pair", "weights_digest"]


class WeightsChanged(RuntimeError):
    """The model's weights differ from what they were when the measurement started: a rollout
    emulation leaked into the training side."""


@dataclass
class SampleBatch(Calibration):
    """Right-padded prompt + completion rows; ``valid`` marks the positions predicting a completion token.

    ``start[i]``: index of row i's first completion token; ``length[i]``: its completion tokens."""

    start: torch.Tensor = field(default=None)
    length: torch.Tensor = field(default=None)

    @property
    def valid(self) -> torch.Tensor:
        # position t predicts token t+1: scored when t+1 lies in [start, start + length)
        t = torch.arange(1, self.input_ids.shape[1], device=self.input_ids.device)[None, :]
        s = self.start[:, None].to(t.device)
        return (t >= s) & (t < s + self.length[:, None].to(t.device))

    @property
    def positions(self) -> torch.Tensor:
        """(B, T-1): the completion position (0 = first generated token) each scored position predicts."""
        t = torch.arange(1, self.input_ids.shape[1], device=self.input_ids.device)[None, :]
        return t - self.start[:, None].to(t.device)

    def rows(self, index) -> "SampleBatch":
        """The rows ``index`` (a slice), trimmed to their own longest row."""
        ids, mask = self.input_ids[index], self.attention_mask[index]
        width = int(mask.sum(-1).max())
        return SampleBatch(ids[:, :width], mask[:, :width], self.start[index], self.length[index])


@dataclass
class Samples:
    """Completions drawn from the model under one emulation, for a list of prompts.

    ``prompt_index[i]``: which prompt row i answers (several samples per prompt share one);
    ``sampler_logp[i]``: the log-probabilities the sampler gave each drawn token (temperature applied)."""

    prompts: list[Prompt]
    prompt_index: list[int]
    completions: list[list[int]]
    sampler_logp: list[list[float]]
    pad: int

    def batch(self) -> SampleBatch:
        rows = [list(self.prompts[p].ids) + c for p, c in zip(self.prompt_index, self.completions)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        start = torch.tensor([len(self.prompts[p].ids) for p in self.prompt_index], dtype=torch.long)
        length = torch.tensor([len(c) for c in self.completions], dtype=torch.long)
        return SampleBatch(ids, mask, start, length)


def _seed_for(seed: int, batch: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * int(batch)) % (2 ** 63)


def sample(model: nn.Module, tokenizer, prompts: list[Prompt], emulation: Emulation, *, max_new_tokens: int,
           temperature: float, samples_per_prompt: int = 1, batch_size: int = 8, seed: int = 0,
           on_batch=None) -> Samples:
    """Draw completions (multinomial sampling at ``temperature``, no top-k/top-p) with ``emulation``
    applied. The draws are seeded per batch (``seed``, batch index): every setting gets the same
    random numbers, so settings whose distributions agree draw the same tokens. The global RNG is
    left as it was. ``on_batch(done, total)`` after each batch.

    Example:
        >>> s = sample(model, tok, build_prompts(tok, ["1+1?"]), Emulation(), max_new_tokens=8, temperature=1.0)
    """
    from transformers import GenerationConfig

    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    order = [p for p in range(len(prompts)) for _ in range(samples_per_prompt)]
    device = input_device(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                              top_p=1.0, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                              output_logits=True, return_dict_in_generate=True)
    completions, logps = [], []
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    eos_set = set(eos)
    for b, rows in enumerate(batches):
        width = max(len(prompts[p].ids) for p in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, p in enumerate(rows):
            n = len(prompts[p].ids)
            ids[r, width - n:] = torch.tensor(prompts[p].ids, dtype=torch.long)
            mask[r, width - n:] = 1
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                emulation.applied(model, seed=seed, step=b, substep=0):
            torch.manual_seed(_seed_for(seed, b))
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        new = out.sequences[:, width:]
        # The sampler's distribution: raw logits / temperature (what multinomial sampling drew from).
        step_logp = torch.stack([torch.log_softmax(lg.float() / temperature, -1) for lg in out.logits], 1)
        token_logp = step_logp.gather(-1, new[..., None])[..., 0].cpu()
        for r in range(len(rows)):
            tokens = new[r].tolist()
            end = next((i + 1 for i, t in enumerate(tokens) if t in eos_set), len(tokens))
            completions.append(tokens[:end])
            logps.append(token_logp[r, :end].tolist())
        if on_batch is not None:
            on_batch(b + 1, len(batches))
    return Samples(prompts=list(prompts), prompt_index=order, completions=completions, sampler_logp=logps, pad=pad)


def weights_digest(model: nn.Module) -> tuple:
    """A cheap fingerprint of every parameter (its object and its sum): a rollout emulation that
    leaked (a swapped or overwritten weight left in place) changes it."""
    with torch.no_grad():
        return tuple((name, id(p), float(p.detach().double().sum())) for name, p in model.named_parameters())


def _forward_logp(model: nn.Module, batch: SampleBatch, temperature: float) -> torch.Tensor:
    device = input_device(model)
    with torch.inference_mode():
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       use_cache=False).logits
        return torch.log_softmax(logits[:, :-1].float() / temperature, -1)


def score_pair(model: nn.Module, batch: SampleBatch, rollout: Emulation, training: Emulation, *,
               temperature: float, seed: int = 0, step: int = 0, digest: tuple | None = None) -> dict:
    """Score the sampled tokens of ``batch`` under the rollout and the training emulation.

    Returns (B, T-1) tensors on the CPU: ``rollout`` and ``training`` (log-probabilities of each
    next token, temperature applied) and ``kl`` (the exact KL(rollout || training) of the two
    next-token distributions at each position). ``digest``: ``weights_digest`` taken before any
    emulation; checked before the training side is scored (``WeightsChanged`` if it differs).
    """
    targets = batch.targets.to(input_device(model))
    with rollout.applied(model, seed=seed, step=step, substep=1):
        lp_r = _forward_logp(model, batch, temperature)
    if digest is not None and weights_digest(model) != digest:
        raise WeightsChanged("the model's weights changed while the rollout side was scored: the rollout "
                             f"emulation {rollout.spec!r} did not restore them, so the training side would be "
                             "scored with the rollout's weights")
    # The same seed: identical emulations on both sides draw identical noise (shared numerics).
    with training.applied(model, seed=seed, step=step, substep=1):
        lp_t = _forward_logp(model, batch, temperature)
    with torch.inference_mode():
        kl = (lp_r.exp() * (lp_r - lp_t)).sum(-1)
        out = {"rollout": lp_r.gather(-1, targets[..., None])[..., 0].cpu(),
               "training": lp_t.gather(-1, targets[..., None])[..., 0].cpu(), "kl": kl.cpu()}
    return out
