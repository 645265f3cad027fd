"""Error models: what a different accelerator does to the numbers it computes.

Each model is a small frozen dataclass with a pure ``apply(x, key) -> tensor`` (same shape, dtype
and device as ``x``). Random models draw their noise from ``torch.Generator(device)`` seeded with
``key``, a 64-bit integer that ``noise_key(seed, site, role, step)`` derives by hashing, so a draw
depends only on (seed, site name, role, step): not on call order, thread count or process.

- ``RelativeGaussian(scale)``: ``x + eps * |x| * scale`` (eps ~ N(0, 1) per element; computed
  as ``x + eps * x * scale``, the same distribution in one pass)
- ``AbsoluteGaussian(scale)``: ``x + eps * scale``
- ``SystematicBias(scale)``: ``x + sign(x) * |x| * scale`` (every magnitude grows by ``scale``)
- ``Truncation(mbits=..)`` or ``Truncation(step=..)``: toward zero on a grid (see the class)
- ``Quantize(fmt, **opts)``: ``hwnoise.quantize(x, fmt, **opts)`` (stochastic rounding keyed too)

``get("relative", 0.05)`` and ``parse("relative:0.05")`` build models from names and strings
(the environment variables of ``hwnoise.inject.env`` use them).

On CPU, torch's mt19937 generator takes the low 32 bits of its seed; keys are 64-bit hashes, so
two different (site, step) pairs share a stream with probability about n^2 / 2^33 over n keys
(CUDA's Philox uses all 64 bits).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "ERRORS",
    "ROLES",
    "AbsoluteGaussian",
    "ErrorModel",
    "Quantize",
    "RelativeGaussian",
    "SystematicBias",
    "Truncation",
    "generator",
    "get",
    "is_name",
    "names",
    "noise_key",
    "parse",
]

# Which computation a draw belongs to: the forward result, or one of the two backward GEMMs.
ROLES = ("forward", "grad_input", "grad_weight")
_KEY_MASK = (1 << 64) - 1
MAX_SCALE = float(torch.finfo(torch.float32).max)  # noise is computed in float32


def noise_key(seed: int, site: str, role: str, step: int) -> int:
    """The 64-bit key of one draw: a hash of (seed, site, role, step), independent of everything else."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    # A hash, not seed + step: neighbouring sites or steps get unrelated streams.
    digest = hashlib.blake2b(f"{seed}\x00{site}\x00{role}\x00{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


def generator(key: int, device) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``key`` (Philox on CUDA, mt19937 on CPU)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(key))
    return g


def _standard_normal(x: torch.Tensor, key: int) -> torch.Tensor:
    # Drawn in fp32 whatever x's dtype, so the same key gives the same noise to fp32 and bf16 copies.
    return torch.randn(x.shape, generator=generator(key, x.device), dtype=torch.float32, device=x.device)


def _check_scale(cls: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{cls} scale must be a number; got {scale!r}")
    if math.isnan(scale) or math.isinf(scale) or scale < 0:
        raise ValueError(f"{cls} scale must be finite and >= 0; got {scale!r}")
    if scale > MAX_SCALE:  # the kernels take the scale as a float32: larger ones overflow mid-run
        raise ValueError(f"{cls} scale {scale!r} is beyond float32's largest number ({MAX_SCALE:.4g}); "
                         f"give a scale <= {MAX_SCALE:.4g}")


class ErrorModel:
    """Base of the error models: ``apply(x, key)`` returns the perturbed copy of ``x``."""

    name = "error"
    random = True  # whether apply draws from the key (deterministic models ignore it)

    def apply(self, x: torch.Tensor, key: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class RelativeGaussian(ErrorModel):
    """``x + eps * |x| * scale``: noise proportional to each value (multiplier error).

    Computed as ``x + eps * x * scale`` in one fused pass (``addcmul``): ``eps * sign(x)`` is
    again i.i.d. N(0, 1), so the two have the same distribution, and skipping ``|x|`` saves a
    pass over memory. The draw ``eps`` is the key's standard normal stream in fp32.
    """

    scale: float
    name = "relative"

    def __post_init__(self):
        _check_scale("RelativeGaussian", self.scale)

    def apply(self, x, key):
        if self.scale == 0:
            return x.clone()
        eps = _standard_normal(x, key)
        x32 = x.float()
        if x.requires_grad and torch.is_grad_enabled():  # differentiable: no out=
            return torch.addcmul(x32, x32, eps, value=self.scale).to(x.dtype)
        # Written into the draw's own buffer: one allocation per call, not two.
        return torch.addcmul(x32, x32, eps, value=self.scale, out=eps).to(x.dtype)


@dataclass(frozen=True)
class AbsoluteGaussian(ErrorModel):
    """``x + eps * scale``: additive noise of fixed size (accumulator or analog noise)."""

    scale: float
    name = "absolute"

    def __post_init__(self):
        _check_scale("AbsoluteGaussian", self.scale)

    def apply(self, x, key):
        if self.scale == 0:
            return x.clone()
        eps = _standard_normal(x, key)
        return torch.add(x.float(), eps, alpha=self.scale).to(x.dtype)


@dataclass(frozen=True)
class SystematicBias(ErrorModel):
    """``x + sign(x) * |x| * scale``: every magnitude off by the same factor (gain error)."""

    scale: float
    name = "bias"
    random = False

    def __post_init__(self):
        _check_scale("SystematicBias", self.scale)

    def apply(self, x, key=None):
        # sign(x) * |x| is x; written as x * scale so NaN/Inf propagate as they would.
        return torch.add(x, x, alpha=self.scale)


@dataclass(frozen=True)
class Truncation(ErrorModel):
    """Toward zero on a grid: a datapath that drops bits instead of rounding.

    ``mbits``: keep this many explicit mantissa bits of each fp32 value (the exponent is kept;
    ``mbits=7`` truncates to bfloat16 precision, ``mbits=10`` to fp16's mantissa without its range
    limits). ``step``: a fixed grid ``k * step`` (fixed point), ``trunc(x / step) * step``.
    Exactly one of the two. Truncation is deterministic and biased toward zero by design.
    """

    mbits: int | None = None
    step: float | None = None
    name = "truncation"
    random = False

    def __post_init__(self):
        if (self.mbits is None) == (self.step is None):
            raise ValueError(f"Truncation takes exactly one of mbits or step; got mbits={self.mbits!r}, step={self.step!r}")
        if self.mbits is not None and (isinstance(self.mbits, bool) or not isinstance(self.mbits, int)
                                       or not 0 <= self.mbits <= 23):
            raise ValueError(f"Truncation mbits must be an integer in 0..23 (fp32 has 23); got {self.mbits!r}")
        if self.step is not None:
            if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not math.isfinite(self.step) \
                    or self.step <= 0:
                raise ValueError(f"Truncation step must be a finite number > 0; got {self.step!r}")

    def apply(self, x, key=None):
        x32 = x.float()
        if self.step is not None:
            return (torch.trunc(x32 / self.step) * self.step).to(x.dtype)
        # Clearing low mantissa bits of the fp32 pattern truncates the magnitude toward zero.
        mask = -(1 << (23 - self.mbits))  # ...1110000 in two's complement: keeps sign, exponent, mbits
        bits = x32.contiguous().view(torch.int32) & mask
        out = bits.view(torch.float32)
        out = torch.where(torch.isfinite(x32), out, x32)  # NaN payloads and Inf stay as they are
        return out.to(x.dtype)


@dataclass(frozen=True)
class Quantize(ErrorModel):
    """``hwnoise.quantize(x, fmt, **opts)``: fake-quantization to a number format.

    Stochastic rounding (``rounding="stochastic"``) draws from the key; other roundings ignore it.
    """

    fmt: str
    opts: tuple = field(default=())
    name = "quantize"

    def __init__(self, fmt, **opts):
        from .formats import get as get_format
        from .plans import WeightPlan, is_plan_spec

        if "seed" in opts or "out" in opts:
            raise ValueError("Quantize takes no seed or out: the noise key decides stochastic rounding")
        if is_plan_spec(fmt):  # a per-module plan (plan.json, a dict, a WeightPlan): see for_site
            fmt = WeightPlan.coerce(fmt)
        else:
            get_format(fmt)  # unknown formats fail here, listing the known ones
        object.__setattr__(self, "fmt", fmt)
        object.__setattr__(self, "opts", tuple(sorted(opts.items())))

    @property
    def plan(self):
        """The WeightPlan when this quantizes module by module, else None."""
        from .plans import WeightPlan

        return self.fmt if isinstance(self.fmt, WeightPlan) else None

    def for_site(self, name: str) -> "Quantize":
        """The error model for module ``name``: with a plan, Quantize of that module's format."""
        if self.plan is None:
            return self
        spec = self.plan.format_for(name)
        if spec is None:
            raise ValueError(f"weight plan {self.plan} has no format for module {name!r}")
        return Quantize(spec, **dict(self.opts))

    @property
    def random(self) -> bool:
        """Whether rounding is stochastic, set by an option or inside the spec string
        (``"mxfp4:rounding=stochastic"``, the ``mxfp4_sr`` alias)."""
        from .formats import get as get_format

        if self.plan is not None:
            return any(self.for_site(n).random for n, _ in self.plan.formats)
        return dict(self.opts).get("rounding", get_format(self.fmt).rounding) == "stochastic"

    def apply(self, x, key=None):
        from .formats import quantize

        if self.plan is not None:
            raise ValueError("Quantize(plan) quantizes module by module: use it through hwnoise.inject "
                             "(where='weight'), which gives each module its format")
        opts = dict(self.opts)
        if self.random:
            opts["seed"] = int(key) & 0x7FFF_FFFF_FFFF_FFFF
        return quantize(x, self.fmt, **opts)

    def __repr__(self):
        extra = "".join(f", {k}={v!r}" for k, v in self.opts)
        return f"Quantize({self.fmt!r}{extra})"


# Names accepted by get/parse (and HWNOISE_ERROR): what each takes as its one argument.
ERRORS = {
    "relative": RelativeGaussian,
    "absolute": AbsoluteGaussian,
    "bias": SystematicBias,
    "truncation": Truncation,
    "quantize": Quantize,
}
_ALIASES = {"relative_gaussian": "relative", "absolute_gaussian": "absolute", "systematic_bias": "bias",
            "truncate": "truncation"}


def names() -> list[str]:
    """The error-model names ``get`` and ``parse`` accept."""
    return list(ERRORS)


def is_name(name: str) -> bool:
    """Whether ``name`` (case-insensitive) is an error-model name or one of its aliases."""
    key = name.strip().lower()
    return key in ERRORS or key in _ALIASES


def get(name, scale=None, **opts) -> ErrorModel:
    """An error model by name: ``get("relative", 0.05)``, ``get("truncation", mbits=7)``,
    ``get("quantize", "mxfp4")``. An ``ErrorModel`` is returned as is.

    For "truncation" a bare int is ``mbits``, a float is ``step``.
    """
    if isinstance(name, ErrorModel):
        return name
    if not isinstance(name, str):
        raise ValueError(f"error must be an error model or a name ({', '.join(ERRORS)}); got {name!r}")
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in ERRORS:
        raise ValueError(f"unknown error model {name!r}; known: {', '.join(ERRORS)}")
    if key == "quantize":
        if scale is None:
            raise ValueError("error model 'quantize' needs a format, e.g. get('quantize', 'mxfp4')")
        return Quantize(scale, **opts)
    if key == "truncation":
        if scale is not None:
            opts["mbits" if isinstance(scale, int) and not isinstance(scale, bool) else "step"] = scale
        return Truncation(**opts)
    if scale is None:
        raise ValueError(f"error model {key!r} needs a scale, e.g. get({key!r}, 0.05)")
    if opts:
        raise ValueError(f"error model {key!r} takes only a scale; got {sorted(opts)}")
    return ERRORS[key](scale)


def _number(text: str, what: str):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad {what} {text!r}; expected a number") from None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def parse(text: str, scale=None) -> ErrorModel:
    """An error model from a string: ``"relative:0.05"``, ``"absolute:1e-3"``, ``"bias:0.01"``,
    ``"truncation:mbits=7"``, ``"truncation:step=0.01"``, ``"quantize:mxfp4"``,
    ``"quantize:nvfp4,rounding=stochastic"``. ``scale`` fills in a bare name (``"relative"``).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"bad error spec {text!r}; expected e.g. 'relative:0.05'; known models: {', '.join(ERRORS)}")
    name, _, rest = text.strip().partition(":")
    rest = rest.strip()
    if not rest:
        return get(name, scale)
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    positional, opts = None, {}
    for i, part in enumerate(parts):
        if "=" in part:
            k, _, v = part.partition("=")
            k, v = k.strip(), v.strip()
            opts[k] = v if k in ("rounding", "scale_mode", "flavor", "ste") else _number(v, f"{k} in {text!r}")
        elif i == 0:
            positional = part
        else:
            raise ValueError(f"bad error spec {text!r}: {part!r} must be key=value")
    canonical = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if positional is not None and canonical != "quantize":
        positional = _number(positional, f"scale in {text!r}")
    if positional is None:
        positional = scale
    if canonical == "truncation" and "mbits" in opts:
        opts["mbits"] = int(opts["mbits"])
    return get(name, positional, **opts)
