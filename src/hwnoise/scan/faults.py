"""``scan_faults``: per decoder layer gain, output kurtosis and instability under two configurations.

A configuration is a format spec string applied to the weights of the selected modules (default:
every linear, lm_head included), e.g. "bf16", "mxfp4", "nvfp4", "mxfp4:rceil"; "none" leaves the
weights as they are. For each configuration, on the calibration texts:

- gain: ||f(x + d) - f(x)|| / ||d|| for the decoder layer f at its own input x, with a small
  seeded Gaussian d (``epsilon`` times the rms of x), over real tokens: how a perturbation
  grows (> 1) or shrinks (< 1) through the layer, residual connection included;
- kurtosis: the excess kurtosis (Fisher, ``scipy.stats.kurtosis``) of the layer's outputs;
- instability: the layer re-run ``repeats`` times with its weights stochastically rounded to the
  format (seeds seed..seed+repeats-1): the mean per-value standard deviation over runs divided by
  the rms of the output (0 for "none").

A layer is flagged when its gain ratio or kurtosis ratio (b / a) falls below ``ratio_threshold``
(0.9): the format damps the layer's sensitivity or flattens its outlier features.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..devices import input_device
from ..formats.fake_quant import quantize
from ..formats.registry import get
from ..select import decoder_layer_index, select_modules
from ..inject.swap import swapped_weight
from .calibration import DEFAULT_MAX_LENGTH, decoder_layers, tokenize
from .core import SCAN_EXCLUDE
from .texts import DEFAULT_SAMPLES, calibration_texts

__all__ = ["FaultLayer", "FaultReport", "NO_CHANGE", "scan_faults"]

NO_CHANGE = ("none", "fp32", "clean")
RATIO_THRESHOLD = 0.9


@dataclass
class FaultLayer:
    layer: int
    gain_a: float
    gain_b: float
    gain_ratio: float
    kurtosis_a: float
    kurtosis_b: float
    kurtosis_ratio: float
    instability_a: float
    instability_b: float
    flags: list[str] = field(default_factory=list)


@dataclass
class FaultReport:
    # The two formats compared. The fields (and the JSON keys) keep their 0.1 names config_a /
    # config_b, so saved scans read the same; format_a / format_b are the names of the API.
    config_a: str
    config_b: str
    epsilon: float
    repeats: int
    ratio_threshold: float
    texts: int
    tokens: int
    layers: list[FaultLayer]

    @property
    def format_a(self) -> str:
        return self.config_a

    @property
    def format_b(self) -> str:
        return self.config_b

    @property
    def flagged(self) -> list[int]:
        return [l.layer for l in self.layers if l.flags]

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "layers"}, "flagged": self.flagged,
                "layers": [asdict(l) for l in self.layers]}

    def to_table(self):
        from rich.table import Table

        t = Table(title=f"Fault scan: {self.config_a} (a) vs {self.config_b} (b), flags below {self.ratio_threshold:g}")
        for c in ("layer", "gain a", "gain b", "gain b/a", "kurtosis a", "kurtosis b", "kurtosis b/a",
                  "instability a", "instability b", "flags"):
            t.add_column(c, justify="right")
        for l in self.layers:
            t.add_row(str(l.layer), f"{l.gain_a:.3f}", f"{l.gain_b:.3f}", f"{l.gain_ratio:.3f}",
                      f"{l.kurtosis_a:.2f}", f"{l.kurtosis_b:.2f}", f"{l.kurtosis_ratio:.3f}",
                      f"{l.instability_a:.2e}", f"{l.instability_b:.2e}", ", ".join(l.flags) or "-")
        return t


def _check_config(config):
    """The resolved format for a configuration (looked up once), or None for "none"."""
    if config is None or (isinstance(config, str) and config.strip().lower() in NO_CHANGE):
        return None
    return get(config)  # unknown -> ValueError naming the known formats


def _hidden(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _ratio(b: float, a: float) -> float:
    return b / a if a != 0 else (math.inf if b > 0 else 1.0)


def scan_faults(
    model: nn.Module,
    tokenizer,
    texts=None,
    format_a="bf16",
    format_b="mxfp4",
    *,
    targets="linear",
    samples: int | None = DEFAULT_SAMPLES,
    max_length: int = DEFAULT_MAX_LENGTH,
    epsilon: float = 1e-2,
    repeats: int = 4,
    seed: int = 0,
    ratio_threshold: float = RATIO_THRESHOLD,
) -> FaultReport:
    """Gain, kurtosis and instability per decoder layer under two weight formats (format spec
    strings, or "none"); layers whose gain or kurtosis ratio b/a falls below ``ratio_threshold``
    are flagged. The model's parameters are never written to."""
    fmt_a, fmt_b = _check_config(format_a), _check_config(format_b)
    if not (isinstance(epsilon, (int, float)) and 0 < epsilon < 1):
        raise ValueError(f"epsilon must be in (0, 1) (the perturbation relative to the input rms); got {epsilon!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer; got {repeats!r}")
    if not (isinstance(ratio_threshold, (int, float)) and 0 < ratio_threshold <= 10):
        raise ValueError(f"ratio_threshold must be a positive number (default 0.9); got {ratio_threshold!r}")
    texts = calibration_texts(texts, samples)
    modules = select_modules(model, targets, exclude=SCAN_EXCLUDE, default_exclude=False)
    if not decoder_layers(model):
        raise ValueError("the model has no decoder layers named like 'layers.N' (or 'h.N', 'blocks.N')")
    calibration = tokenize(tokenizer, texts, max_length, input_device(model))
    was_training = model.training
    model.eval()
    try:
        a = _measure(model, calibration, modules, fmt_a, epsilon=epsilon, repeats=repeats, seed=seed)
        b = _measure(model, calibration, modules, fmt_b, epsilon=epsilon, repeats=repeats, seed=seed)
    finally:
        model.train(was_training)
    rows = []
    for index in sorted(a):
        (ga, ka, ia), (gb, kb, ib) = a[index], b[index]
        gain_ratio, kurt_ratio = _ratio(gb, ga), _ratio(kb, ka)
        flags = [name for name, r in (("gain", gain_ratio), ("kurtosis", kurt_ratio)) if r < ratio_threshold]
        rows.append(FaultLayer(index, ga, gb, gain_ratio, ka, kb, kurt_ratio, ia, ib, flags))
    return FaultReport(str(format_a), str(format_b), float(epsilon), repeats, float(ratio_threshold),
                       len(texts), calibration.tokens, rows)


@torch.inference_mode()
def _measure(model, calibration, modules, config, *, epsilon, repeats, seed):
    """{layer: (gain, kurtosis, instability)} with the model's weights under ``config``."""
    from scipy.stats import kurtosis

    layers = decoder_layers(model)
    clean = {name: m._parameters["weight"].detach() for name, m in modules.items()}
    valid = calibration.attention_mask.bool()
    records: dict[int, tuple] = {}
    stochastic = config.with_options(rounding="stochastic") if config is not None else None
    with ExitStack() as stack:
        if config is not None:
            for name, m in modules.items():
                stack.enter_context(swapped_weight(m, quantize(clean[name], config)))
        handles = []

        def pre(index):
            def hook(module, args, kwargs, output):
                records.setdefault(index, (args, kwargs, output))
            return hook

        try:
            for index, layer in layers.items():
                handles.append(layer.register_forward_hook(pre(index), with_kwargs=True))
            model(input_ids=calibration.input_ids, attention_mask=calibration.attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()

        out = {}
        generator = torch.Generator(device=calibration.input_ids.device)
        for index, layer in layers.items():
            args, kwargs, output = records[index]
            if args:
                x, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                x, rest = kwargs.pop("hidden_states"), ()
            y = _hidden(output)
            generator.manual_seed(seed + index)
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device).to(x.dtype)
            rms = x[valid].float().pow(2).mean().sqrt()
            delta = epsilon * rms * noise * valid[..., None]
            y2 = _hidden(layer(x + delta, *rest, **kwargs))
            gain = float((y2 - y)[valid].float().norm() / delta[valid].float().norm())
            kurt = float(kurtosis(y[valid].double().flatten().cpu().numpy(), fisher=True))

            instability = 0.0
            if config is not None and repeats > 1:
                members = {n: m for n, m in modules.items() if decoder_layer_index(n) == index}
                runs = []
                for r in range(repeats):
                    with ExitStack() as inner:
                        for n, m in members.items():
                            q = quantize(clean[n], stochastic, seed=seed + 1000 * r + index)
                            inner.enter_context(swapped_weight(m, q))
                        runs.append(_hidden(layer(x, *rest, **kwargs))[valid].float())
                stacked = torch.stack(runs)
                mean = stacked.mean(0)
                instability = float(stacked.std(0).mean() / mean.pow(2).mean().sqrt().clamp_min(1e-30))
            out[index] = (gain, kurt, instability)
    return out
