"""``scan``: per selected module, the error metrics of a format and its end-to-end effect alone."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..devices import input_device, place
from ..emulation import Emulation
from ..errors import noise_key
from ..formats.fake_quant import options_for, quantize
from ..formats.registry import FormatSpec, get
from ..inject.swap import quantized_input, quantized_weight, swapped_weight, swapped_weights
from ..plans import WeightPlan
from ..progress import ProgressCallback, progress_reporter
from ..select import decoder_layer_index, is_linear, is_rmsnorm, select_modules
from .calibration import DEFAULT_MAX_LENGTH, CleanPass, tokenize
from .measures import STAT_KEYS, stats_to_metrics, tensor_stats
from .report import LayerRow, ModuleRow, ScanReport, Thresholds
from .plan import DEFAULT_EACH, check_plan_targets, parse_candidates, search_plan
from .texts import BUILTIN_TEXTS, DEFAULT_SAMPLES, calibration_texts

__all__ = ["FORMAT_OPTIONS", "ResolvedFormat", "SCANNABLE", "WHERE", "resolve_format", "scan", "scan_emulation"]

WHERE = ("weight", "input")  # the format/where shorthand: weights:FMT or inputs:FMT
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


SCANNABLE = ("weights:FMT", "weights:plan.json", "inputs:FMT", "ERROR@input", "ERROR@output", "ERROR@weight")


def scan_emulation(setting=None, format=None, where=None) -> Emulation:  # noqa: A002
    """The Emulation a scan measures, from a setting or the ``format``/``where`` shorthand, checked
    for what a per-module scan can measure (one part, at module level) before any work.

    Args:
        setting: an emulation spec or ``Emulation`` (``"weights:mxfp4"``, ``"inputs:nvfp4"``,
            ``"weights:plan.json"``, ``"absolute:1e-3@output"``), or None for the shorthand.
        format: shorthand: a format name or spec string (default ``"mxfp4"``).
        where: shorthand: ``"weight"`` (default) or ``"input"``.

    Example:
        >>> scan_emulation(format="mxfp4", where="input").spec
        'inputs:mxfp4'
    """
    if setting is not None:
        if not isinstance(setting, (str, Emulation)):
            raise ValueError(f"a scan's setting (its third argument) is an emulation spec such as 'weights:mxfp4'; "
                             f"got a {type(setting).__name__} (calibration texts go to texts=)")
        if format is not None or where is not None:
            raise ValueError(f"give the setting {setting!r} or format=/where=, not both (format/where are "
                             f"shorthand for weights:FMT / inputs:FMT)")
        emulation = Emulation.parse(setting)
    else:
        where = "weight" if where is None else where
        if where not in WHERE:
            raise ValueError(f"unknown where {where!r}; known: {', '.join(WHERE)}")
        format = "mxfp4" if format is None else format  # noqa: A001
        if isinstance(format, FormatSpec):
            format = format.name  # noqa: A001 - a spec without options: its name
        if not isinstance(format, str) or not format.strip():
            raise ValueError(f"format must be a format name or spec string such as 'mxfp4'; got {format!r}")
        emulation = Emulation(weight_format=format) if where == "weight" else Emulation(input_format=format)
    parts = [name for name, on in (("weights", emulation.weight_format), ("inputs", emulation.input_format),
                                   ("an error model", emulation.error), ("aqn", emulation.aqn_sigma)) if on]
    why = None
    if emulation.aqn_sigma:
        why = "AQN (aqn:SIGMA) is noise on every RMSNorm weight at once, not a per-module condition"
    elif emulation.error is not None and emulation.where == "ops":
        why = (f"operator noise ({emulation.error}@ops) is on every op of the model at once, not per module; "
               f"scan it at module level, e.g. {emulation.error}@output")
    elif not parts:
        why = "'clean' changes nothing"
    elif len(parts) > 1:
        why = f"it has {len(parts)} parts ({', '.join(parts)}); a scan ranks modules under one part at a time"
    if why:
        raise ValueError(f"cannot scan {emulation.spec!r} module by module: {why}. A scan measures one of: "
                         f"{', '.join(SCANNABLE)}")
    return emulation


def _where(emulation: Emulation) -> str:
    if emulation.weight_format:
        return "weight"
    if emulation.input_format:
        return "input"
    return emulation.where


def scan(
    model: nn.Module,
    tokenizer,
    setting=None,
    texts=None,
    *,
    format=None,  # noqa: A002 - the public name the issue and DESIGN use
    where: str | None = None,
    targets=None,
    thresholds=None,
    end_to_end: bool = True,
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
    """Scan ``model`` module by module under one hardware condition: each selected module alone.

    Args:
        model, tokenizer: the model (its parameters are never written to; hooks always removed)
            and its tokenizer.
        setting: the condition, an emulation spec or ``Emulation``: ``"weights:mxfp4"`` (each
            module's weight quantized), ``"inputs:mxfp4"`` (its input activations),
            ``"weights:plan.json"`` (each of the plan's modules in its planned format), or a
            module-level error model, ``"absolute:1e-3@output"`` / ``@input`` / ``@weight``.
            Not scannable per module (refused before any work): ``@ops`` noise, ``aqn:``, two parts.
        format, where: shorthand for the setting: ``format="mxfp4", where="weight"`` is
            ``"weights:mxfp4"`` (the default), ``where="input"`` is ``"inputs:mxfp4"``.
            format_options (scale_mode, rounding, block, axis, flavor, seed) go to
            ``hwnoise.quantize``; ``seed`` also keys an error model's noise.
        targets, layers, exclude: as ``hwnoise.select`` (default: the setting's targets, else
            "linear"); the lm_head is included (only LoRA adapters are excluded by default).
        texts: calibration texts (None: the built-in set; a sequence of strings; or a file path),
            the first ``samples`` of them, each truncated to ``max_length`` tokens.
        end_to_end: also measure, per module, the increase of the language-model loss and the mean
            KL(clean || changed) of next-token distributions with only that module changed, and the
            whole-model effect (every selected module changed at once).
        plan: search a mixed-precision plan (weights:FMT only; see ``hwnoise.scan.plan``): True for
            the scan's format + bf16, or candidate formats ("mxfp6_e2m3;mxfp8_e4m3;bf16", commas
            between names also accepted, or a list); one target of target_kl, target_loss (nats)
            or budget_bits (effective bits per weight; default: KL a third of the whole-model KL).
            held_out: texts that re-measure the plan (None: the built-in texts after the
            calibration ones when texts is None, else none; False: none).
        on_progress: ``on_progress(label, done, total)`` after each module of each phase: label
            "<phase> <module name>" (phases "metrics", "end_to_end", then the plan search's
            "plan <format>" and "plan joint").
        device, dtype: move / cast the model first (in place; None leaves it as it is).

    Returns:
        A ``ScanReport`` (JSON first; tables, HTML and plots are views).

    Example:
        >>> report = hn.scan(model, tok, "weights:mxfp4")            # doctest: +SKIP
        >>> report = hn.scan(model, tok, "absolute:1e-3@output")     # doctest: +SKIP
    """
    emulation = scan_emulation(setting, format, where)
    where = _where(emulation)
    spec_targets = emulation.targets if emulation.targets != "linear" else None
    targets = targets if targets is not None else (spec_targets or "linear")
    error = emulation.error_model if emulation.error is not None else None
    weight_plan = emulation.weights if isinstance(emulation.weights, WeightPlan) else None
    if error is not None or weight_plan is not None:
        given = sorted(k for k, v in format_options.items() if v is not None and k != "seed")
        if given:
            raise ValueError(f"format options {given} are for one number format (weights:FMT or inputs:FMT); "
                             f"the setting {emulation.spec!r} takes none")
        resolved = None
    else:
        given_spec = format if isinstance(format, FormatSpec) else None  # keeps its options
        resolved = resolve_format(given_spec or emulation.weights or emulation.inputs, format_options)  # one look-up
    seed = int(format_options.get("seed") or 0)
    report_progress = progress_reporter(on_progress, what="scan")
    format_name = emulation.weight_format or emulation.input_format or emulation.error
    base_spec = format_name
    if plan is not None and plan is not False:
        if where != "weight" or resolved is None:
            raise ValueError(f"the plan search chooses one weight format per module starting from weights:FMT "
                             f"(format=FMT, where='weight'); it cannot start from {emulation.spec!r}")
        if not end_to_end:
            raise ValueError("the plan search ranks modules by their end-to-end effect: it needs end_to_end=True")
        if any(v is not None for v in format_options.values()):
            raise ValueError(f"with a plan, give format options in the spec string (e.g. 'mxfp4:rceil'), not as "
                             f"{sorted(k for k, v in format_options.items() if v is not None)}")
        parse_candidates(plan if plan is not True else None, base_spec)  # bad candidates fail before the scan
        check_plan_targets(target_kl, target_loss, budget_bits, plan if plan is not True else None, base_spec)
    if held_out is None and texts is None and samples is not None and plan not in (None, False):
        held_out = list(BUILTIN_TEXTS[samples:2 * samples]) or None
    thresholds = Thresholds.coerce(thresholds)
    texts = calibration_texts(texts, samples)
    excludes = SCAN_EXCLUDE + ((exclude,) if isinstance(exclude, str) else tuple(exclude or ())) + emulation.exclude
    if weight_plan is not None:
        modules = weight_plan.select(model, exclude=excludes)
        if layers is not None:
            modules = {n: m for n, m in modules.items() if decoder_layer_index(n) in set(layers)}
    else:
        modules = select_modules(model, targets, layers=layers, exclude=excludes, default_exclude=False)
    format_options.pop("seed", None)

    place(model, device, dtype)  # bad names fail before any pass
    device = input_device(model)
    calibration = tokenize(tokenizer, texts, max_length, device)
    valid_tokens = calibration.attention_mask.bool()
    was_training = model.training
    model.eval()

    def key(name: str) -> int:
        return noise_key(seed, name, "forward", 0)

    def on_tokens(full: torch.Tensor, y_full: torch.Tensor):
        # Metrics on real tokens only; the changed copy is of the whole tensor, as in the pass.
        if full.shape[:2] == valid_tokens.shape:
            here = valid_tokens.to(full.device)  # a model spread over devices
            return full[here], y_full[here]
        return full, y_full

    t0 = time.perf_counter()
    try:
        clean = CleanPass(model, calibration, watch=modules, capture_inputs=(where == "input"),
                          capture_outputs=(where == "output"))
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
                    if resolved is not None:
                        y = resolved.quantize(x)
                        o = resolved.options(x)
                    elif weight_plan is not None:
                        fmt = weight_plan.spec_for(name)
                        y = quantized_weight(x, fmt)
                        o = options_for(x, fmt)
                    else:
                        y, o = error.apply(x, key(name)), None
                    quantized[name] = y
                    rows_stats[name] = tensor_stats(x, y, o)
                else:
                    captured = clean.inputs if where == "input" else clean.outputs
                    if name not in captured:
                        raise ValueError(f"{name} was not called with a tensor {where} on the calibration texts")
                    full = captured[name]
                    y_full = resolved.quantize(full) if resolved is not None else error.apply(full, key(name))
                    x, y = on_tokens(full, y_full)
                    rows_stats[name] = tensor_stats(x, y, resolved.options(x) if resolved is not None else None)
                report_progress("metrics", name, done, len(modules))
        t_metrics = time.perf_counter() - t1
        clean.inputs.clear()
        clean.outputs.clear()

        def change_of(name: str, module: nn.Module):
            if where == "weight":
                return swapped_weight(module, quantized[name])
            if where == "input":
                if resolved is not None:
                    return quantized_input(module, resolved.quantize)
                return quantized_input(module, lambda x, _k=key(name): error.apply(x, _k))
            return _noisy_output(module, error, key(name))

        effects = {}
        t2 = time.perf_counter()
        if end_to_end:
            for done, (name, module) in enumerate(modules.items(), 1):
                layer = decoder_layer_index(name)
                effects[name] = clean.effect(name, layer, lambda name=name, module=module: change_of(name, module))
                report_progress("end_to_end", name, done, len(modules))
        whole_model = None
        if end_to_end:
            if where == "weight":
                def change_all():
                    return swapped_weights((module, quantized[name]) for name, module in modules.items())
            else:
                def change_all():
                    stack = ExitStack()
                    for name, module in modules.items():
                        stack.enter_context(change_of(name, module))
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
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return ScanReport(
        model=model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        format=format_name,
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
        setting=emulation.spec,
        dtype=str(first.dtype).removeprefix("torch.") if first is not None else None,
        device=str(device),
    )


@contextmanager
def _noisy_output(module: nn.Module, error, key: int):
    """The module's output perturbed by ``error`` with one fixed key (a module-level error at @output)."""
    def hook(mod, args, output):
        if isinstance(output, torch.Tensor):
            return error.apply(output, key)
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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


