"""``scan``: per selected module, the error metrics of a format and its end-to-end effect alone."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..devices import input_device, place
from ..formats import fake_quant, quantize
from ..formats.registry import get
from ..select import decoder_layer_index, is_linear, is_rmsnorm, select_modules
from .calibration import DEFAULT_MAX_LENGTH, CleanPass, tokenize
from .measures import STAT_KEYS, stats_to_metrics, tensor_stats
from .report import LayerRow, ModuleRow, ScanReport, Thresholds
from .plan import DEFAULT_EACH, parse_candidates, search_plan
from .texts import BUILTIN_TEXTS, DEFAULT_SAMPLES, calibration_texts

__all__ = ["MODES", "FORMAT_OPTIONS", "scan"]

MODES = ("weight", "input")
FORMAT_OPTIONS = ("scale_mode", "rounding", "block", "axis", "flavor", "seed")
# Never scanned unless named: LoRA adapters are the trainable part, not the deployed weights.
SCAN_EXCLUDE = ("lora_A", "lora_B")


def _kind(module: nn.Module) -> str:
    return "linear" if is_linear(module) else "rmsnorm" if is_rmsnorm(module) else type(module).__name__


def _check_format(fmt, format_options: dict):
    unknown = sorted(set(format_options) - set(FORMAT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown scan option(s) {unknown}; format options: {', '.join(FORMAT_OPTIONS)}")
    spec = get(fmt)  # unknown format -> ValueError naming the known ones
    probe = torch.zeros(2, 64)
    fake_quant._options(probe, spec, *(format_options.get(k) for k in ("scale_mode", "rounding", "block", "axis",
                                                                        "flavor")))
    return spec


@contextmanager
def _swapped_weight(module: nn.Module, weight: torch.Tensor):
    """Run with ``module.weight`` replaced by another tensor; the original Parameter object is put
    back on exit (also on errors), so the model's parameters are never written to. Tied weights
    (lm_head and the embedding) stay tied to the clean copy: only this module sees the change."""
    original = module._parameters["weight"]
    module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    try:
        yield
    finally:
        module._parameters["weight"] = original


@contextmanager
def _quantized_input(module: nn.Module, quantizer: Callable[[torch.Tensor], torch.Tensor]):
    def hook(mod, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return (quantizer(args[0]),) + tuple(args[1:])
        return None

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def scan(
    model: nn.Module,
    tokenizer,
    texts=None,
    format="mxfp4",  # noqa: A002 - the public name the issue and DESIGN use
    mode: str = "weight",
    targets="linear",
    thresholds=None,
    end_to_end: bool = True,
    *,
    samples: int | None = DEFAULT_SAMPLES,
    max_length: int = DEFAULT_MAX_LENGTH,
    layers=None,
    exclude=None,
    on_step: Callable[[str, str], None] | None = None,
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
    mode: "weight" quantizes each module's weight (W4A16-style), "input" its input activations
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
    on_step(phase, module_name) is called after each module of each phase ("metrics", "end_to_end").
    device, dtype: move / cast the model first (in place; None leaves it as it is: a model spread
    over devices by a device map stays so, and the texts go to its input embedding's device).
    The model's parameters are never written to; hooks are always removed.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    spec = _check_format(format, format_options)
    base_spec = format.strip() if isinstance(format, str) else spec.name
    if plan is not None and plan is not False:
        if mode != "weight":
            raise ValueError(f"the plan search chooses weight formats: it needs mode='weight'; got mode={mode!r}")
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
    seed = format_options.pop("seed", 0)
    options = {k: v for k, v in format_options.items() if v is not None}
    if options.get("rounding", spec.rounding) == "stochastic":
        options["seed"] = seed

    place(model, device, dtype)  # bad names fail before any pass
    device = input_device(model)
    calibration = tokenize(tokenizer, texts, max_length, device)
    valid_tokens = calibration.attention_mask.bool()
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        clean = CleanPass(model, calibration, watch=modules, capture_inputs=(mode == "input"))
        t_clean = time.perf_counter() - t0

        rows_stats, quantized = {}, {}
        t1 = time.perf_counter()
        with torch.inference_mode():
            for name, module in modules.items():
                if mode == "weight":
                    weight = module._parameters.get("weight")
                    if weight is None or not weight.is_floating_point():
                        raise ValueError(f"{name} ({type(module).__name__}) has no floating-point weight to quantize")
                    x = weight.detach()
                    y = quantize(x, spec, **options)
                    quantized[name] = y
                    o = fake_quant._options(x, spec, *(options.get(k) for k in ("scale_mode", "rounding", "block",
                                                                                   "axis", "flavor")))
                    rows_stats[name] = tensor_stats(x, y, o)
                else:
                    if name not in clean.inputs:
                        raise ValueError(f"{name} was not called with a tensor input on the calibration texts")
                    full = clean.inputs[name]
                    y_full = quantize(full, spec, **options)
                    # Metrics on real tokens only; the quantized copy is of the whole input, as in the pass.
                    if full.shape[:2] == valid_tokens.shape:
                        here = valid_tokens.to(full.device)  # a model spread over devices
                        x, y = full[here], y_full[here]
                    else:
                        x, y = full, y_full
                    o = fake_quant._options(x, spec, *(options.get(k) for k in ("scale_mode", "rounding", "block",
                                                                                   "axis", "flavor")))
                    rows_stats[name] = tensor_stats(x, y, o)
                if on_step:
                    on_step("metrics", name)
        t_metrics = time.perf_counter() - t1
        clean.inputs.clear()

        effects = {}
        t2 = time.perf_counter()
        if end_to_end:
            for name, module in modules.items():
                layer = decoder_layer_index(name)
                if mode == "weight":
                    def change(module=module, y=quantized[name]):
                        return _swapped_weight(module, y)
                else:
                    def change(module=module):
                        return _quantized_input(module, lambda t: quantize(t, spec, **options))
                effects[name] = clean.effect(name, layer, change)
                if on_step:
                    on_step("end_to_end", name)
        whole_model = None
        if end_to_end:
            if mode == "weight":
                def change_all():
                    stack = ExitStack()
                    for name, module in modules.items():
                        stack.enter_context(_swapped_weight(module, quantized[name]))
                    return stack
            else:
                def change_all():
                    stack = ExitStack()
                    for module in modules.values():
                        stack.enter_context(_quantized_input(module, lambda t: quantize(t, spec, **options)))
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
                each=plan_each, saturation_threshold=thresholds.saturation_ratio, on_step=on_step)
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
        mode=mode,
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
