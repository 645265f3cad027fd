"""Adaptive Quantization Noise on a model's weights: fresh Gaussian noise per step, exact restore.

The noisy weight is ``cast(master + sigma * multiplier * N(0, 1))`` for RMSNorm weights and
``cast(master + sigma * multiplier * |master| * N(0, 1))`` (relative noise) for linear weights,
where ``master`` is an fp32 (or wider) copy of the clean weight and ``cast`` writes the weight's
own dtype. Noise is never added to the low-precision weights themselves, never accumulates
across steps, and ``restore`` writes the clean weights back bit for bit.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import quantize
from ..select import LAYER_TYPES, decoder_layer_index, decoder_layer_indices, is_rmsnorm, parse_layers, select_modules
from .multipliers import LayerMultipliers
from .schedules import Schedule

__all__ = ["AQN", "LINEAR_SIGMA_WARNING", "NOISE_ROUNDING", "NoiseStats"]

# The seeds found relative noise on linear weights destructive from here on (warned once).
LINEAR_SIGMA_WARNING = 0.005
NOISE_ROUNDING = ("stochastic", "nearest")  # how the noisy master is cast (hwnoise.formats.ROUNDING_MODES: elements)
# Casts with stochastic rounding, by the formats registry name of the target dtype.
_STOCHASTIC_CASTS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class NoiseStats:
    """What one ``apply`` did to one parameter.

    Noise figures are in the units of ``requested_sigma``: absolute for RMSNorm weights, relative
    to ``|w|`` for linear weights (over the nonzero clean entries). ``master_noise_std`` is the std
    of (noisy - clean) in the fp32 master, before the cast; ``effective_std`` the std of
    (weights as written - clean) after the cast to ``dtype``, i.e. the noise the model really sees.
    """

    parameter: str
    layer: int | None
    layer_type: str
    dtype: str
    numel: int
    step: int
    sigma: float
    multiplier: float
    requested_sigma: float
    master_noise_std: float
    effective_std: float
    changed_fraction: float


def _stream_seed(seed: int, name: str, step: int, role: str) -> int:
    # A hash, not seed + step: every (parameter, step, role) gets an independent stream, and the
    # draw does not depend on which other parameters were drawn before it.
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{step}\x00{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _std(x: torch.Tensor) -> float:
    return float(x.double().std()) if x.numel() > 1 else 0.0


class AQN:
    """Adaptive Quantization Noise (QeRL) on RMSNorm weights, optionally on linear weights.

    schedule: a ``Schedule`` (``StagedDecay``, ``EpochAwareDecay``, ``Constant``) giving sigma per step.
    targets: "rmsnorm" (absolute noise on norm weights), "linear" (noise relative to ``|w|``
    on linear weights; lm_head, embeddings and LoRA adapters are excluded), or both.
    layers: decoder-layer indices (ints or "14-17"); exclude: extra name globs to leave alone.
    multipliers: ``{layer index: factor}``, a path to the scan's JSON export
    (``{"layer_multipliers": {"14": 1.5}, "default_multiplier": 1.0, "targeted": [14, 15]}``)
    or a ``LayerMultipliers``; keys are checked against the model on ``apply``.
    seed: noise is keyed by (seed, parameter name, step), so a run replays exactly whatever the
    call order (on one device type) and the same noise reaches weights of any dtype.
    rounding: how the noisy fp32 master is cast to bf16/fp16 weights. "stochastic" (default) is
    unbiased, so noise below half a unit in the last place still lands on average; "nearest"
    rounds it away (sigma 1e-3 vanishes on bf16 weights near 1.0).

    Lifecycle: ``apply`` copies the clean weights when the model is clean (so a master taken
    before an optimizer step is never reused) and writes noisy ones; ``apply`` again before
    ``restore`` redraws from the same clean copy (no accumulation); ``restore`` writes the clean
    weights back bit for bit and warns if they were modified in place meanwhile (that change is
    discarded). ``with aqn.noisy(model, step, total_steps):`` restores also on exceptions.
    One AQN instance holds one model's clean copy at a time.
    """

    def __init__(
        self,
        schedule: Schedule,
        targets=("rmsnorm",),
        layers=None,
        multipliers=None,
        exclude=None,
        seed: int = 0,
        *,
        rounding: str = "stochastic",
    ):
        if not callable(getattr(schedule, "sigma_at", None)):
            raise ValueError(
                f"schedule must be a Schedule (StagedDecay, EpochAwareDecay, Constant); got {schedule!r}"
            )
        types = (targets,) if isinstance(targets, str) else tuple(targets)
        unknown = [t for t in types if t not in LAYER_TYPES]
        if not types or unknown:
            raise ValueError(f"unknown targets {unknown or types!r}; known: {', '.join(LAYER_TYPES)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        if rounding not in NOISE_ROUNDING:
            raise ValueError(f"unknown rounding {rounding!r}; known: {', '.join(NOISE_ROUNDING)}")
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.schedule = schedule
        self.targets = tuple(dict.fromkeys(types))
        self.layers = parse_layers(layers) if layers is not None else None
        self.multipliers = LayerMultipliers.coerce(multipliers)
        self.exclude = tuple(exclude) if exclude is not None else ()
        self.seed = seed
        self.rounding = rounding
        self._model_ref = None  # weakref to the model while noise is applied
        self._params: dict[str, nn.Parameter] = {}
        self._clean: dict[str, torch.Tensor] = {}  # clean copies in the weights' own dtype
        self._versions: dict[str, int] = {}
        self._stats: dict[str, NoiseStats] = {}
        self._warned_linear = False

    def __repr__(self) -> str:
        return (
            f"AQN({self.schedule!r}, targets={self.targets!r}, layers={self.layers!r}, "
            f"multipliers={self.multipliers!r}, exclude={self.exclude!r}, seed={self.seed}, "
            f"rounding={self.rounding!r})"
        )

    @property
    def applied(self) -> bool:
        """True between ``apply`` and ``restore``."""
        return self._model_ref is not None

    def sigma_at(self, step: int, total_steps: int, steps_per_epoch: int | None = None) -> float:
        """The schedule's sigma at ``step`` (before per-layer multipliers)."""
        return self.schedule.sigma_at(step, total_steps, steps_per_epoch)

    def parameter_multipliers(self, model: nn.Module) -> dict[str, float]:
        """``{parameter name: multiplier}`` for every weight this AQN would noise in ``model``."""
        return {name: entry[3] for name, entry in self._plan(model).items()}

    def standard_noise(self, parameter: str, shape, step: int, device="cpu") -> torch.Tensor:
        """The N(0, 1) draw (fp32) that ``apply`` uses for ``parameter`` at ``step``."""
        generator = torch.Generator(device=device)
        generator.manual_seed(_stream_seed(self.seed, parameter, step, "noise"))
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device)

    def stats(self) -> dict[str, NoiseStats]:
        """Per noised parameter, what the last ``apply`` requested and what landed after the cast."""
        return dict(self._stats)

    def _plan(self, model: nn.Module) -> dict[str, tuple[nn.Parameter, int | None, str, float]]:
        """``{parameter name: (parameter, layer index, layer type, multiplier)}`` for targeted weights."""
        self.multipliers.check_model(decoder_layer_indices(model))
        modules = select_modules(model, self.targets, layers=self.layers, exclude=self.exclude or None)
        plan, seen = {}, set()
        for module_name, module in modules.items():
            weight = module._parameters.get("weight")
            if weight is None or id(weight) in seen:  # tied weights are noised once
                continue
            seen.add(id(weight))
            if not weight.is_floating_point():
                raise TypeError(f"{module_name}.weight has dtype {weight.dtype}; AQN needs floating-point weights")
            layer = decoder_layer_index(module_name)
            if not self.multipliers.is_targeted(layer):
                continue
            layer_type = "rmsnorm" if is_rmsnorm(module) else "linear"
            plan[f"{module_name}.weight"] = (weight, layer, layer_type, self.multipliers.multiplier(layer))
        if not plan:
            raise ValueError(
                f"no selected weight lies in the targeted layers {sorted(self.multipliers.targeted or ())} "
                f"({len(modules)} modules selected by targets={self.targets}, layers={self.layers})"
            )
        return plan

    def _cast(self, noisy: torch.Tensor, dtype: torch.dtype, name: str, step: int) -> torch.Tensor:
        if noisy.dtype == dtype:
            return noisy
        if self.rounding == "stochastic" and dtype in _STOCHASTIC_CASTS:
            seed = _stream_seed(self.seed, name, step, "rounding")
            # Values on the target grid, unbiased: E[cast(x)] = x, so sub-ulp noise still lands.
            on_grid = quantize(noisy.float(), _STOCHASTIC_CASTS[dtype], rounding="stochastic", seed=seed)
            return on_grid.to(dtype)
        return noisy.to(dtype)

    def _check_model(self, model: nn.Module, verb: str) -> None:
        current = self._model_ref() if self._model_ref is not None else None
        if current is not model:
            raise ValueError(
                f"cannot {verb}: this AQN holds the clean weights of another model; "
                "restore that model first, or use one AQN per model"
            )

    def _modified(self) -> list[str]:
        return [name for name, p in self._params.items() if p._version != self._versions[name]]

    def apply(self, model: nn.Module, step: int, total_steps: int, steps_per_epoch: int | None = None) -> float:
        """Write fresh noisy weights for ``step`` of ``total_steps``; returns the schedule's sigma.

        The noise is drawn from the clean weights (copied now if the model is clean), never from
        the current noisy ones. A parameter whose sigma x multiplier is 0 (warm-up, multiplier 0)
        is left bit-identical.
        """
        sigma = self.schedule.sigma_at(step, total_steps, steps_per_epoch)
        if self.applied:
            self._check_model(model, "apply")
            modified = self._modified()
            if modified:
                self._warn_modified(modified, "apply redraws from the clean copy")
        plan = self._plan(model)
        self._warn_linear(sigma, plan)

        if not self.applied:
            self._model_ref = weakref.ref(model)
        stats: dict[str, NoiseStats] = {}
        try:
            for name, (param, layer, layer_type, multiplier) in plan.items():
                requested = sigma * multiplier
                if requested == 0:
                    if name in self._clean:  # noisy from an earlier apply: back to clean
                        self._write(name, param, self._clean[name])
                    noise_std = effective = changed = 0.0
                else:
                    if name not in self._clean:
                        self._clean[name] = param.detach().clone()
                    new, noise_std, effective, changed = self._noisy(name, param, layer_type, requested, step)
                    self._write(name, param, new)
                stats[name] = NoiseStats(
                    parameter=name, layer=layer, layer_type=layer_type, dtype=str(param.dtype).replace("torch.", ""),
                    numel=param.numel(), step=step, sigma=sigma, multiplier=multiplier, requested_sigma=requested,
                    master_noise_std=noise_std, effective_std=effective, changed_fraction=changed,
                )
        except BaseException:
            self.restore(model)  # never leave half-noised weights behind
            raise
        self._stats = stats
        return sigma

    def _noisy(self, name, param, layer_type, requested, step):
        clean = self._clean[name]
        master_dtype = torch.promote_types(clean.dtype, torch.float32)
        master = clean.to(master_dtype)  # exact: fp32 holds every bf16/fp16 value
        draw = self.standard_noise(name, clean.shape, step, clean.device).to(master_dtype)
        if layer_type == "linear":  # relative: the noise scales with |w|, zeros stay zero
            scale = master.abs()
            noisy = master + requested * scale * draw
            keep = scale != 0
        else:
            noisy = master + requested * draw
            scale, keep = None, None
        new = self._cast(noisy, clean.dtype, name, step)

        def spread(values: torch.Tensor) -> float:
            diff = values - master
            if scale is not None:  # relative noise: report it relative to |w|
                diff = diff[keep] / scale[keep]
            return _std(diff)

        changed = float((new != clean).float().mean()) if clean.numel() else 0.0
        return new, spread(noisy), spread(new.to(master_dtype)), changed

    def _write(self, name: str, param: nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)
        self._params[name] = param
        self._versions[name] = param._version

    def restore(self, model: nn.Module) -> None:
        """Write the clean weights back, bit for bit. A no-op when no noise is applied."""
        if not self.applied:
            return
        current = self._model_ref()
        if current is not None and current is not model:
            self._check_model(model, "restore")
        modified = self._modified()
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._clean[name])
        self._model_ref = None
        self._params, self._clean, self._versions = {}, {}, {}
        if modified:
            self._warn_modified(modified, "restore wrote the clean weights over that change")

    @contextmanager
    def noisy(self, model: nn.Module, step: int, total_steps: int, steps_per_epoch: int | None = None):
        """``with aqn.noisy(model, step, total_steps): generate()`` applies noise and always restores."""
        if self.applied:
            raise RuntimeError("noise is already applied; restore before entering noisy() (no nesting)")
        self.apply(model, step, total_steps, steps_per_epoch)
        try:
            yield self
        finally:
            self.restore(model)

    def _warn_linear(self, sigma: float, plan) -> None:
        if self._warned_linear:
            return
        strongest = max((sigma * m for _, _, t, m in plan.values() if t == "linear"), default=0.0)
        if strongest >= LINEAR_SIGMA_WARNING:
            self._warned_linear = True
            warnings.warn(
                f"AQN on linear weights with relative sigma {strongest:g} (>= {LINEAR_SIGMA_WARNING}): "
                "earlier runs found linear-weight noise this strong destructive; RMSNorm-only AQN is the default",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _warn_modified(names: list[str], consequence: str) -> None:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"weights were modified in place while AQN noise was applied ({shown}), e.g. by an "
            f"optimizer step inside noisy(); {consequence}. Restore before updating the weights.",
            RuntimeWarning,
            stacklevel=3,
        )

