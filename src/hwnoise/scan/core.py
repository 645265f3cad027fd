"""``scan``: per selected module, the error metrics of a format and its end-to-end effect alone."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..devices import input_device, place
from ..formats.fake_quant import options_for, quantize
from ..formats.registry import FormatSpec, get
from ..progress import ProgressCallback, progress_reporter
from ..select import decoder_layer_index, is_linear, is_rmsnorm, select_modules
from .calibration import DEFAULT_MAX_LENGTH, CleanPass, quantized_input, swapped_weight, tokenize
from .measures import STAT_KEYS, stats_to_metrics, tensor_stats
from .report import LayerRow, ModuleRow, ScanReport, Thresholds
from .plan import DEFAULT_EACH, parse_candidates, search_plan
from .texts import BUILTIN_TEXTS, DEFAULT_SAMPLES, calibration_texts

__all__ = ["FORMAT_OPTIONS", "ResolvedFormat", "WHERE", "resolve_format", "scan"]

WHERE = ("weight", "input")  # where on a module the scan quantizes (MODES until 0.3)
FORMAT_OPTIONS = ("scale_mode", "rounding", "block", "axis", "flavor", "seed")
SPEC_OPTIONS = ("scale_mode", "rounding", "block", "flavor")  # the ones a FormatSpec holds
# Never scanned unless named: LoRA adapters are the trainable part, not the deployed weights.
SCAN_EXCLUDE = ("lora_A", "lora_B")


def _kind(module: nn.Module) -> str:
    return "linear" if is_linear(module) else "rmsnorm" if is_rmsnorm(module) else type(module).__name__


class ResolvedFormat:
    """A scan's format, resolved once: the FormatSpec with its options applied, the block axis
    and the seed. ``quantize(x)`` and ``options(x)`` go straight to the kernels (no registry look-up
    per module or per call)."""

    __slots__ = ("spec", "axis", "call")

    def __init__(self, spec: FormatSpec, axis=None, **seed):
        self.spec, self.axis = spec, axis
        self.call = {**({"axis": axis} if axis is not None else {}), **seed}  # seed: only for stochastic rounding

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.spec, **self.call)

    def options(self, x: torch.Tensor):
        return options_for(x, self.spec, axis=self.axis)


def resolve_format(format, format_options: dict) -> ResolvedFormat:  # noqa: A002
    """Validate ``format`` and the scan's format options once; the result quantizes every module."""
    unknown = sorted(set(format_options) - set(FORMAT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown scan option(s) {unknown}; format options: {', '.join(FORMAT_OPTIONS)}")
    spec = get(format)  # unknown format -> ValueError naming the known ones
    spec = spec.with_options(**{k: format_options.get(k) for k in SPEC_OPTIONS})
    axis = format_options.get("axis")
    options_for(torch.zeros(2, 64), spec, axis=axis)  # a bad axis fails before any work
    seed = {"seed": format_options.get("seed", 0)} if spec.rounding == "stochastic" else {}
    return ResolvedFormat(spec, axis, **seed)


def scan(
    model: nn.Module,
    tokenizer,
    texts=None,
    format="mxfp4",  # noqa: A002 - the public name the issue and DESIGN use
    where: str = "weight",
    targets="linear",
    thresholds=None,
    end_to_end: bool = True,
    *,
    samples: int | None = DEFAULT_SAMPLES,
    max_length: int = DEFAULT_MAX_LENGTH,
    layers=None,
    exclude=None,
    on_progress: ProgressCallback | None = None,
    model_name: str | None = None,
    plan=None,
    target_kl: float | None = None,
    target_loss: float | None = None,
    budget_bits: float | None = None,
    held_out=None,
    plan_each: int = DEFAULT_EACH,
    device=None,
    dtype=None,
    **format_options,
) -> ScanReport:
    """Scan ``model`` module by module under a number format.

    format: a registered name or spec string ("mxfp4", "nvfp4", "mxfp4:rceil"); format_options
    (scale_mode, rounding, block, axis, flavor, seed) go to ``hwnoise.quantize``.
    where: "weight" quantizes each module's weight (W4A16-style), "input" its input activations
    on the calibration texts (W16A4-style). targets/layers/exclude: as ``hwnoise.select``; the
    lm_head is included (only LoRA adapters are excluded by default).
    texts: calibration texts (None: the built-in set; a sequence of strings; or a file path),
    the first ``samples`` of them, each truncated to ``max_length`` tokens.
    end_to_end: also measure, per module, the increase of the language-model loss and the mean
    KL(clean || quantized) of next-token distributions with only that module quantized.
    With end_to_end, the whole-model effect (every selected module quantized at once) is measured too.
    plan: search a mixed-precision plan (weight mode; see ``hwnoise.scan.plan``): True for the
    scan's format + bf16, or candidate formats ("mxfp4,mxfp6_e2m3,mxfp8_e4m3,bf16" or a list); one
    target of target_kl, target_loss (nats) or budget_bits (effective bits per weight; default:
    KL a third of the whole-model KL). held_out: texts that re-measure the plan (None: the built-in
    texts after the calibration ones when texts is None, else none; False: none).
    on_progress(label, done, total) is called after each module of each phase: label
    "<phase> <module name>" (phases "metrics", "end_to_end", then the plan search's "plan <format>"
    and "plan joint"), done of total steps of that phase.
    device, dtype: move / cast the model first (in place; None leaves it as it is: a model spread
    over devices by a device map stays so, and the texts go to its input embedding's device).
    The model's parameters are never written to; hooks are always removed.
    """
    if where not in WHERE:
        raise ValueError(f"unknown where {where!r}; known: {', '.join(WHERE)}")
    resolved = resolve_format(format, format_options)  # the one registry look-up of the scan
    spec = resolved.spec
    report_progress = progress_reporter(on_progress, what="scan")
    base_spec = format.strip() if isinstance(format, str) else spec.name
    if plan is not None and plan is not False:
        if where != "weight":
            raise ValueError(f"the plan search chooses weight formats: it needs where='weight'; got where={where!r}")
        if not end_to_end:
            raise ValueError("the plan search ranks modules by their end-to-end effect: it needs end_to_end=True")
        if any(v is not None for v in format_options.values()):
            raise ValueError(f"with a plan, give format options in the spec string (e.g. 'mxfp4:rceil'), not as "
                             f"{sorted(k for k, v in format_options.items() if v is not None)}")
        parse_candidates(plan if plan is not True else None, base_spec)  # bad candidates fail before the scan
    if held_out is None and texts is None and samples is not None and plan not in (None, False):
        held_out = list(BUILTIN_TEXTS[samples:2 * samples]) or None
    thresholds = Thresholds.coerce(thresholds)
    texts = calibration_texts(texts, samples)
    excludes = SCAN_EXCLUDE + ((exclude,) if isinstance(exclude, str) else tuple(exclude or ()))
    modules = select_modules(model, targets, layers=layers, exclude=excludes, default_exclude=False)
    format_options.pop("seed", None)

    place(model, device, dtype)  # bad names fail before any pass
    device = input_device(model)
    calibration = tokenize(tokenizer, texts, max_length, device)
    valid_tokens = calibration.attention_mask.bool()
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        clean = CleanPass(model, calibration, watch=modules, capture_inputs=(where == "input"))
        t_clean = time.perf_counter() - t0

        rows_stats, quantized = {}, {}
        t1 = time.perf_counter()
        with torch.inference_mode():
            for done, (name, module) in enumerate(modules.items(), 1):
                if where == "weight":
                    weight = module._parameters.get("weight")
                    if weight is None or not weight.is_floating_point():
                        raise ValueError(f"{name} ({type(module).__name__}) has no floating-point weight to quantize")
                    x = weight.detach()
                    y = resolved.quantize(x)
                    quantized[name] = y
                    rows_stats[name] = tensor_stats(x, y, resolved.options(x))
                else:
                    if name not in clean.inputs:
                        raise ValueError(f"{name} was not called with a tensor input on the calibration texts")
                    full = clean.inputs[name]
                    y_full = resolved.quantize(full)
                    # Metrics on real tokens only; the quantized copy is of the whole input, as in the pass.
                    if full.shape[:2] == valid_tokens.shape:
                        here = valid_tokens.to(full.device)  # a model spread over devices
                        x, y = full[here], y_full[here]
                    else:
                        x, y = full, y_full
                    rows_stats[name] = tensor_stats(x, y, resolved.options(x))
                report_progress("metrics", name, done, len(modules))
        t_metrics = time.perf_counter() - t1
        clean.inputs.clear()

        effects = {}
        t2 = time.perf_counter()
        if end_to_end:
            for done, (name, module) in enumerate(modules.items(), 1):
                layer = decoder_layer_index(name)
                if where == "weight":
                    def change(module=module, y=quantized[name]):
                        return swapped_weight(module, y)
                else:
                    def change(module=module):
                        return quantized_input(module, resolved.quantize)
                effects[name] = clean.effect(name, layer, change)
                report_progress("end_to_end", name, done, len(modules))
        whole_model = None
        if end_to_end:
            if where == "weight":
                def change_all():
                    stack = ExitStack()
                    for name, module in modules.items():
                        stack.enter_context(swapped_weight(module, quantized[name]))
                    return stack
            else:
                def change_all():
                    stack = ExitStack()
                    for module in modules.values():
                        stack.enter_context(quantized_input(module, resolved.quantize))
                    return stack
            loss_all, kl_all = clean.effect("", None, change_all)
            whole_model = {"loss_increase": loss_all, "kl": kl_all}
        t_e2e = time.perf_counter() - t2
        plan_result = None
        if plan is not None and plan is not False:
            t3 = time.perf_counter()
            held = None
            if held_out:
                held_texts = calibration_texts(held_out, None)
                held = CleanPass(model, tokenize(tokenizer, held_texts, max_length, device))
            plan_result = search_plan(
                modules, clean, base_spec, plan if plan is not True else None, effects, quantized=quantized,
                target_kl=target_kl, target_loss=target_loss, budget_bits=budget_bits, held_out=held,
                each=plan_each, saturation_threshold=thresholds.saturation_ratio, report=report_progress)
            t_plan = time.perf_counter() - t3
        quantized.clear()
    finally:
        model.train(was_training)

    rows = []
    for name, module in modules.items():
        s = rows_stats[name]
        m = stats_to_metrics(s)
        loss_inc, kl = effects.get(name, (None, None))
        rows.append(ModuleRow(
            name=name, layer=decoder_layer_index(name), kind=_kind(module), numel=s["numel"],
            **m, loss_increase=loss_inc, kl=kl,
            problems=thresholds.problems(m), stats={k: s[k] for k in STAT_KEYS},
        ))
    return ScanReport(
        model=model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        format=format.strip() if isinstance(format, str) else spec.name,
        format_options={k: v for k, v in format_options.items() if v is not None},
        mode=where,  # the JSON key stays "mode" (outputs unchanged)
        targets=targets if isinstance(targets, str) else list(targets),
        thresholds=thresholds,
        texts=len(texts),
        tokens=calibration.tokens,
        max_length=max_length,
        clean_loss=clean.clean_loss,
        end_to_end=end_to_end,
        rows=rows,
        layers=aggregate_layers(rows, thresholds),
        seconds={"clean_pass": round(t_clean, 3), "metrics": round(t_metrics, 3),
                 "end_to_end": round(t_e2e, 3), **({"plan": round(t_plan, 3)} if plan_result else {}),
                 "total": round(time.perf_counter() - t0, 3)},
        whole_model=whole_model,
        plan=plan_result,
    )


def aggregate_layers(rows: Iterable[ModuleRow], thresholds: Thresholds) -> list[LayerRow]:
    """Per decoder layer: metrics pooled over its modules (SQNR from summed signal and noise
    energies, ratios element-weighted), the worst module SQNR, and the summed and largest
    end-to-end effects. A layer is problematic when its pooled metrics cross a threshold."""
    by_layer: dict[int, list[ModuleRow]] = {}
    for row in rows:
        if row.layer is not None:
            by_layer.setdefault(row.layer, []).append(row)
    out = []
    for index in sorted(by_layer):
        members = by_layer[index]
        pooled = {k: sum(r.stats[k] for r in members) for k in STAT_KEYS}
        m = stats_to_metrics(pooled)
        effects = [r for r in members if r.kl is not None]
        finite = [r.sqnr_db for r in members if math.isfinite(r.sqnr_db)]
        out.append(LayerRow(
            layer=index, modules=len(members), **m,
            sqnr_db_min=min(finite) if finite else math.inf,
            kl_sum=sum(r.kl for r in effects) if effects else None,
            kl_max=max(r.kl for r in effects) if effects else None,
            loss_increase_sum=sum(r.loss_increase for r in effects) if effects else None,
            loss_increase_max=max(r.loss_increase for r in effects) if effects else None,
            problematic_modules=sum(1 for r in members if r.problematic),
            problems=thresholds.problems(m),
        ))
    return out
