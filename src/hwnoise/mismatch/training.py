"""The mismatch measured in a short training run: a minimal GRPO loop that logs, per step, what
TRL logs with vLLM rollouts (``sampling/sampling_logp_difference/mean``: mean |log pi_train -
log pi_sampler| over the step's completion tokens), so the offline prediction can be checked.

Each step: draw ``group`` completions per prompt from the policy with the rollout emulation applied
(HF ``generate``; the sampler's own log-probabilities are kept, as vLLM returns them), score them
with the policy under the training emulation (a teacher-forced forward with gradients: the
trainer's ``old_per_token_logps``), log the difference, then one GRPO update (group-normalized
strict-answer rewards, the token-mean surrogate of TRL's ``loss_type="dapo"`` with one iteration,
no KL term) with AdamW. The policy is a copy: the caller's model is not changed.

This stands in for ``hwnoise train`` with vLLM rollouts, which does not log the difference yet:
it runs the same rollout emulation and the same two log-probabilities, not TRL's trainer.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ..data import load_problems
from ..emulation import Emulation
from ..eval.generate import build_prompts
from ..progress import ProgressCallback, progress_reporter
from ..rewards import is_correct
from .sampling import sample

__all__ = ["measure_in_training"]


def measure_in_training(model, tokenizer, rollouts, *, training="clean", steps: int = 2, prompts="arith", n: int = 4,
                        group: int = 2, max_new_tokens: int = 32, temperature: float = 1.0, lr: float = 1e-5,
                        batch_size: int = 8, seed: int = 0, on_progress: ProgressCallback | None = None) -> dict:
    """Run ``steps`` GRPO steps per rollout setting (each from a fresh copy of ``model``) and log the
    per-step log-prob difference between the sampler and the training policy.

    Args:
        model, tokenizer: the policy at its training precision (copied per setting).
        rollouts: rollout emulation specs; training: the training side's spec.
        steps, n, group: steps per setting, prompts per step, completions per prompt.
        max_new_tokens, temperature, lr, batch_size, seed: the loop's sampling and optimizer.

    Returns ``{"settings": [{"spec", "steps": [{"step", "abs_logp_diff", "max_abs_logp_diff",
    "tokens", "reward_mean", "loss"}], "abs_logp_diff_mean", "seconds"}], "config": {...}}``.

    Example:
        >>> out = measure_in_training(model, tok, ["clean", "weights:nvfp4"], steps=2)
        >>> out["settings"][1]["steps"][0]["abs_logp_diff"]
    """
    train = Emulation.parse(training)
    specs = [Emulation.parse(r) for r in ([rollouts] if isinstance(rollouts, str) else rollouts)]
    report = progress_reporter(on_progress, what="measure_in_training")
    problems = load_problems(prompts, n=steps * n, seed=seed, split="train") if not isinstance(prompts, list) \
        else None
    questions = [p.question for p in problems] if problems else [str(q) for q in prompts]
    golds = [p.gold for p in problems] if problems else [None] * len(questions)
    out = []
    for spec in specs:
        t0 = time.perf_counter()
        policy = copy.deepcopy(model)
        policy.requires_grad_(True)
        opt = torch.optim.AdamW(policy.parameters(), lr=lr)
        rows = []
        for step in range(steps):
            qs = questions[step * n:(step + 1) * n]
            gs = golds[step * n:(step + 1) * n]
            rendered = build_prompts(tokenizer, qs)
            s = sample(policy, tokenizer, rendered, spec, max_new_tokens=max_new_tokens, temperature=temperature,
                       samples_per_prompt=group, batch_size=batch_size, seed=seed + 1000 * step)
            batch = s.batch()
            valid = batch.valid
            with train.applied(policy, seed=seed, step=step, grad=True):
                logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(
                    -1, batch.targets[..., None])[..., 0]
            old = logp.detach()
            sampler = torch.zeros_like(old)
            for r in range(old.shape[0]):
                sampler[r][valid[r]] = torch.tensor(s.sampler_logp[r], dtype=old.dtype)
            delta = (old - sampler).abs()[valid]
            rewards = []
            for r, tokens in enumerate(s.completions):
                gold = gs[s.prompt_index[r]]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                rewards.append(float(gold is not None and is_correct(text, gold)))
            rw = torch.tensor(rewards).view(-1, group)
            adv = ((rw - rw.mean(1, keepdim=True)) / (rw.std(1, keepdim=True, unbiased=False) + 1e-4)).view(-1)
            ratio = torch.exp(logp - old)
            loss = -((adv[:, None] * ratio) * valid).sum() / valid.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows.append({"step": step, "abs_logp_diff": float(delta.mean()), "max_abs_logp_diff": float(delta.max()),
                         "tokens": int(valid.sum()), "reward_mean": float(rw.mean()), "loss": float(loss.detach())})
            report("train", spec.spec, step + 1, steps)
        del policy, opt
        out.append({"spec": spec.spec, "steps": rows,
                    "abs_logp_diff_mean": float(np.mean([r["abs_logp_diff"] for r in rows])),
                    "seconds": round(time.perf_counter() - t0, 3)})
    return {"settings": out, "config": {"training": train.spec, "steps": steps, "n": n, "group": group,
                                        "max_new_tokens": max_new_tokens, "temperature": temperature, "lr": lr,
                                        "seed": seed, "measure": "TRL sampling/sampling_logp_difference/mean "
                                        "(sampler log-probabilities vs the training forward)"}}
