"""Which modules cause the mismatch: one module's emulation at a time, on the policy's own samples;
and a mixed-precision plan search whose objective is that mismatch.

``attribute(model, tokenizer, rollout)`` draws completions from the training policy (the model as
it is), then, for each module the rollout emulation selects, switches that module's emulation on
alone and measures on the completion tokens, by one teacher-forced forward (the scan's end-to-end
machinery, ``hwnoise.scan.calibration.CleanPass``, on a ``SampleBatch`` instead of calibration
texts: the decoder layers before the module return their cached output):

- ``kl``: the exact KL(training || rollout) of the next-token distributions, averaged over the
  completion tokens (the mismatch per token, with no sampling noise of its own), and
- ``k1``: the mean of log pi_train - log pi_rollout at the sampled tokens (k1 of the same KL).

Modules are ranked by ``kl``. Weight formats (a format or a plan), input formats and module-level
errors (``@input``, ``@output``, ``@weight``) are attributable; operator noise (``@ops``) and AQN
act on every operator / norm at once and are refused with a message saying so.

``search_mismatch_plan(...)`` runs ``hwnoise.scan.plan.search_plan`` with that objective: the solo
effects are the attribution's, and every point of the plan's Pareto table is the KL on the
policy's samples with the whole plan in place (held-out: samples of other prompts).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..devices import input_device
from ..emulation import Emulation
from ..eval.generate import build_prompts
from ..formats import quantize
from ..plans import WeightPlan, is_plan_spec
from ..progress import ProgressCallback, progress_reporter
from ..select import decoder_layer_index, select_modules
from .core import check_options
from .sampling import SampleBatch, sample

__all__ = ["ATTRIBUTION_FILE", "attribute", "module_changes", "policy_samples", "search_mismatch_plan"]

ATTRIBUTION_FILE = "attribution.json"


def _questions(prompts, n: int, seed: int, skip: int = 0) -> list[str]:
    from ..data import load_problems

    if isinstance(prompts, (list, tuple)):
        qs = [str(q) for q in prompts][skip:skip + n]
        if not qs:
            raise ValueError(f"no prompts left after the first {skip}; give more prompts")
        return qs
    return [p.question for p in load_problems(prompts, n=skip + n, seed=seed)][skip:]


def policy_samples(model: nn.Module, tokenizer, *, prompts="arith", n: int = 16, skip: int = 0,
                   max_new_tokens: int = 64, temperature: float = 1.0, samples_per_prompt: int = 1,
                   batch_size: int = 8, seed: int = 0, on_batch=None) -> SampleBatch:
    """Completions drawn from the model as it is (the training policy), as a ``SampleBatch`` on the
    model's input device. ``skip``: start after the first ``skip`` prompts (held-out samples).

    Example:
        >>> batch = policy_samples(model, tok, n=8, max_new_tokens=32)
        >>> batch.predictions  # completion tokens scored
    """
    check_options(n=n, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                  temperature=temperature, batch_size=batch_size, seed=seed)
    rendered = build_prompts(tokenizer, _questions(prompts, n, seed, skip))
    s = sample(model, tokenizer, rendered, Emulation(), max_new_tokens=max_new_tokens, temperature=temperature,
               samples_per_prompt=samples_per_prompt, batch_size=batch_size, seed=seed + skip, on_batch=on_batch)
    b = s.batch()
    device = input_device(model)
    return SampleBatch(b.input_ids.to(device), b.attention_mask.to(device), b.start.to(device), b.length.to(device))


def _swapped(module: nn.Module, weight: torch.Tensor):
    from ..inject.swap import swapped_weight  # the one static swap (issue 21)

    return swapped_weight(module, weight)


def _input_quantized(module: nn.Module, fmt: str):
    from ..inject.swap import quantized_input

    return quantized_input(module, lambda x: quantize(x, fmt))


def module_changes(model: nn.Module, rollout) -> dict[str, object]:
    """Module name -> a context-manager factory that switches on the rollout emulation's part for
    that module alone. ValueError for emulations that are not per module (operator noise, AQN) or
    that select nothing.

    Example:
        >>> changes = module_changes(model, "weights:mxfp4")
        >>> with changes["model.layers.0.mlp.down_proj"](): ...
    """
    e = Emulation.parse(rollout)
    if e.is_clean:
        raise ValueError("the clean setting has no module to attribute; give a rollout emulation such as 'weights:nvfp4'")
    if e.aqn_sigma or (e.error is not None and e.where == "ops"):
        what = "AQN (aqn:SIGMA) perturbs every norm weight" if e.aqn_sigma else \
            f"operator noise ({e.error}@ops) acts on every GEMM call"
        raise ValueError(f"{what} at once, not one module at a time; per-module attribution takes weight formats "
                         f"(weights:FMT, weights:plan.json), input formats (inputs:FMT) and module-level errors "
                         f"(e.g. {e.error or 'relative:0.05'}@output); got {e.spec!r}")
    plan = WeightPlan.coerce(e.weight_format) if e.weight_format and is_plan_spec(e.weight_format) else None
    if plan is not None:
        modules = plan.select(model, exclude=e.exclude)
    else:
        modules = select_modules(model, e.targets, exclude=e.exclude or None)
    changes: dict[str, object] = {}
    for name, module in modules.items():
        parts = []
        if e.weight_format:
            fmt = plan.format_for(name) if plan else e.weight_format
            if isinstance(module._parameters.get("weight"), torch.Tensor):
                parts.append(("weight", module, fmt))
        if e.input_format:
            parts.append(("input", module, e.input_format))
        if e.error is not None:
            parts.append(("error", name, Emulation(error=e.error, where=e.where, targets=name)))
        if not parts:
            continue

        def change(parts=parts):
            @contextmanager
            def ctx():
                with ExitStack() as stack:
                    for kind, where, what in parts:
                        if kind == "weight":
                            with torch.no_grad():
                                q = quantize(where.weight.detach(), what)
                            stack.enter_context(_swapped(where, q))
                        elif kind == "input":
                            stack.enter_context(_input_quantized(where, what))
                        else:
                            stack.enter_context(what.applied(model))
                    yield
            return ctx()
        changes[name] = change
    if not changes:
        raise ValueError(f"rollout emulation {e.spec!r} selects no module with a weight; nothing to attribute")
    return changes


def _all_at_once(changes: dict):
    @contextmanager
    def ctx():
        with ExitStack() as stack:
            for factory in changes.values():
                stack.enter_context(factory())
            yield
    return ctx


def attribute(model: nn.Module, tokenizer, rollout, *, samples: SampleBatch | None = None, prompts="arith",
              n: int = 16, max_new_tokens: int = 64, temperature: float = 1.0, batch_size: int = 8, seed: int = 0,
              on_progress: ProgressCallback | None = None) -> dict:
    """Per-module attribution of the rollout emulation's mismatch (see the module docstring).

    Args:
        model, tokenizer: the training policy.
        rollout: the rollout emulation spec (e.g. "weights:nvfp4", "weights:plan.json", "inputs:mxfp8_e4m3",
            "relative:0.05@output").
        samples: a ``SampleBatch`` of the policy's own completions (default: drawn here, from ``prompts``).
        prompts, n, max_new_tokens, temperature, batch_size, seed: how the samples are drawn.
        on_progress: ``on_progress(label, done, total)`` per module.

    Returns a dict: ``rollout``, ``tokens``, ``modules`` (``module``, ``kl``, ``k1``, ``layer``; largest ``kl``
    first), ``whole`` (every module at once) and ``seconds``.

    Example:
        >>> a = attribute(model, tok, "weights:mxfp4", n=8, max_new_tokens=32)
        >>> a["modules"][0]["module"]  # the module whose emulation alone moves the policy most
    """
    from ..scan.calibration import CleanPass

    e = Emulation.parse(rollout)
    changes = module_changes(model, e)  # bad specs fail before sampling
    report = progress_reporter(on_progress, what="attribute")
    t0 = time.perf_counter()
    if samples is None:
        samples = policy_samples(model, tokenizer, prompts=prompts, n=n, max_new_tokens=max_new_tokens,
                                 temperature=temperature, batch_size=batch_size, seed=seed,
                                 on_batch=lambda d, t: report("sample", "policy", d, t))
    t1 = time.perf_counter()
    clean = CleanPass(model, samples)
    rows = []
    for done, (name, change) in enumerate(changes.items(), 1):
        loss, kl = clean.effect(name, decoder_layer_index(name), change)
        rows.append({"module": name, "layer": decoder_layer_index(name), "kl": kl, "k1": loss})
        report("attribute", name, done, len(changes))
    loss, kl = clean.effect("", None, _all_at_once(changes))
    rows.sort(key=lambda r: -r["kl"])
    return {"rollout": e.spec, "tokens": samples.predictions, "sequences": int(samples.input_ids.shape[0]),
            "measure": "exact KL(training || rollout) per completion token on the policy's own samples (T=1)",
            "modules": rows, "whole": {"kl": kl, "k1": loss},
            "seconds": {"sampling": round(t1 - t0, 3), "attribution": round(time.perf_counter() - t1, 3)}}


def search_mismatch_plan(model: nn.Module, tokenizer, base: str = "mxfp4", candidates="bf16", *,
                         target_kl: float | None = None, budget_bits: float | None = None, prompts="arith",
                         n: int = 16, max_new_tokens: int = 64, batch_size: int = 8, seed: int = 0,
                         held_out: bool = True, on_progress: ProgressCallback | None = None):
    """A mixed-precision weight plan chosen by the mismatch on the policy's own samples instead of
    the calibration-text KL: ``hwnoise.scan.plan.search_plan`` with a ``CleanPass`` on a
    ``SampleBatch`` (completion tokens only), solo effects from ``attribute``. Returns its
    ``PlanResult`` (``.formats`` is the plan: write it as plan.json and use it as weights:plan.json).

    Args:
        base: the rollout weight format the plan starts from; candidates: wider formats ("bf16", "mxfp8_e4m3,bf16").
        target_kl / budget_bits: the plan target (default: a third of the all-``base`` mismatch KL).
        held_out: re-measure the chosen plan on samples of the next ``n`` prompts.

    Example:
        >>> plan = search_mismatch_plan(model, tok, "nvfp4", "bf16", n=8)
        >>> plan.formats  # module -> format
    """
    from ..scan.calibration import CleanPass
    from ..scan.plan import parse_candidates, search_plan

    parse_candidates(candidates, base)  # bad formats fail before sampling
    report = progress_reporter(on_progress, what="search_mismatch_plan")
    samples = policy_samples(model, tokenizer, prompts=prompts, n=n, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, seed=seed, on_batch=lambda d, t: report("sample", "policy", d, t))
    attribution = attribute(model, tokenizer, f"weights:{base}", samples=samples, on_progress=on_progress)
    solo = {r["module"]: (r["k1"], r["kl"]) for r in attribution["modules"]}
    modules = {name: m for name, m in select_modules(model, "linear").items() if name in solo}
    clean = CleanPass(model, samples)
    held = None
    if held_out:
        held = CleanPass(model, policy_samples(model, tokenizer, prompts=prompts, n=n, skip=n,
                                               max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed))
    result = search_plan(modules, clean, base, candidates, solo, target_kl=target_kl, budget_bits=budget_bits,
                         held_out=held, on_progress=on_progress)
    result.cost["objective"] = "mismatch KL(training || rollout) on the policy's own completions"
    return result
