"""One hardware condition applied to a model: ``Emulation``.

Evaluation settings and RL rollouts both need "run this model as if on that hardware" and then
put it back. An ``Emulation`` names the condition; ``applied(model, seed, step)`` switches it on
for a block and restores the model exactly on exit, also when the block raises:

- ``weight_format`` (W4A16-style): every selected linear weight quantized to a number format;
- ``input_format`` (W16A4-style): the selected modules' input activations quantized;
- ``error`` at ``where`` = "ops" (operator level: ``noisy_ops``, the backward too when
  ``grad=True``) or "input" / "output" / "weight" (module level: ``inject``);
- ``aqn_sigma``: AQN-style Gaussian noise on the RMSNorm weights with a constant sigma.

Spec strings name the same thing in one line (``Emulation.parse``): parts joined by ``+``, each
one of ``clean``, ``weights:FMT``, ``inputs:FMT``, ``aqn:SIGMA``, an error spec with an optional
``@where`` (``relative:0.05@ops``, ``absolute:1e-3@input``) and, for ``@ops``, an optional op list
(``relative:0.05@ops[linear]``, ``@ops[all]``), ``targets:T1,T2`` and ``exclude:G1,G2`` (the modules
the weight/input formats and module-level errors select); e.g. ``"weights:nvfp4+aqn:0.01"``,
``"absolute:1e-3@output+targets:layers.14-17+exclude:*.down_proj"``.

The spec is the identity of a setting (evaluation de-duplicates and keys its records by it):
``Emulation.parse(e.spec) == e`` and ``str(e) == e.spec``. Fields that change nothing are brought
to their defaults at construction so that equal behaviour means equal spec: ``where`` and ``ops``
without an error, ``ops`` at module level, ``targets``/``exclude`` when nothing selects modules
(operator noise and AQN alone); ops are kept in registry order, a one-element targets list is
that target.

Every draw inside ``applied(model, seed, step)`` is keyed by (seed, step) and the site, never by
what ran before: the same (seed, step) on the same inputs replays the same noise, so a batched
evaluation can resume at any batch and get what an uninterrupted run got.
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from . import errors as E
from .aqn import AQN, Constant
from .formats import get as get_format, quantize
from .inject.hooks import inject
from .inject.ops import ALL_OPS, DEFAULT_OPS, noisy_ops, resolve_ops
from .plans import WeightPlan, check_weight_format, is_plan_spec
from .select import parse_names, select_modules

__all__ = ["EMULATION_WHERE", "Emulation", "EmulationStats", "format_number"]

EMULATION_WHERE = ("ops", "input", "output", "weight")
_SPEC_FORMS = ("clean", "weights:FMT", "inputs:FMT", "aqn:SIGMA",
               "ERROR[@where] (e.g. relative:0.05@ops, relative:0.05@ops[linear], absolute:1e-3@output)",
               "targets:T1,T2", "exclude:G1,G2")
_WHERE_PART = re.compile(r"^\s*([A-Za-z_]+)\s*(?:\[(.*)\])?\s*$")
_DEFAULT_TARGETS = "linear"


def _derived_seed(seed: int, step: int, what: str, substep: int = 0) -> int:
    """A 63-bit seed for one part of one (seed, step, substep) block."""
    site = f"emulation/{what}" + (f"/{substep}" if substep else "")
    return E.noise_key(seed, site, "forward", step) & 0x7FFF_FFFF_FFFF_FFFF


def format_number(value: float) -> str:
    """A float as emulation specs write it: short (``0.01``, ``1e-05``) but exact (it parses back
    to the same float)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True)
class Emulation:
    """A hardware condition: weight format, input format, an error model (operator or module
    level) and AQN norm noise, each optional. ``Emulation()`` is clean."""

    weight_format: str | None = None
    input_format: str | None = None
    error: str | None = None
    where: str = "ops"
    ops: tuple[str, ...] = DEFAULT_OPS
    aqn_sigma: float = 0.0
    targets: str | tuple[str, ...] = "linear"
    exclude: tuple[str, ...] = field(default=())

    def __post_init__(self):
        for name in ("weight_format", "input_format"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{name} must be a format name such as 'mxfp4'; got {value!r}")
                if name == "weight_format":  # a format, or a per-module plan (plan.json from `hwnoise scan --plan`)
                    check_weight_format(value.strip())
                else:
                    get_format(value.strip())  # unknown formats fail here, listing the known ones
                object.__setattr__(self, name, value.strip())
        if self.error is not None:
            text = self.error if isinstance(self.error, str) else None
            if not text or not text.strip():
                raise ValueError(f"error must be an error spec such as 'relative:0.05'; got {self.error!r}")
            E.parse(text)  # unknown models or bad scales fail here, naming what is accepted
            object.__setattr__(self, "error", text.strip())
        if self.where not in EMULATION_WHERE:
            raise ValueError(f"unknown where {self.where!r}; known: {', '.join(EMULATION_WHERE)}")
        ops = set(resolve_ops(self.ops))
        object.__setattr__(self, "ops", tuple(o for o in ALL_OPS if o in ops))  # order changes nothing
        sigma = self.aqn_sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"aqn_sigma must be a finite number >= 0; got {sigma!r}")
        object.__setattr__(self, "aqn_sigma", float(sigma))
        targets = parse_names(self.targets, "targets")
        if not targets:
            raise ValueError("targets is empty; give a layer type such as 'linear' or a name glob")
        object.__setattr__(self, "targets", targets[0] if len(targets) == 1 else targets)
        object.__setattr__(self, "exclude", parse_names(self.exclude or (), "exclude"))
        # Fields that change nothing take their defaults: equal behaviour, equal identity (spec).
        if self.error is None or self.where != "ops":
            object.__setattr__(self, "ops", DEFAULT_OPS)
        if self.error is None:
            object.__setattr__(self, "where", "ops")
        selects = self.weight_format or self.input_format or (self.error is not None and self.where != "ops")
        if not selects:
            object.__setattr__(self, "targets", _DEFAULT_TARGETS)
            object.__setattr__(self, "exclude", ())

    def __str__(self) -> str:
        return self.spec

    # -- naming ------------------------------------------------------------------------------

    @classmethod
    def parse(cls, spec) -> Emulation:
        """An ``Emulation`` from a spec string (see the module docstring), or ``spec`` itself."""
        if isinstance(spec, Emulation):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"bad emulation spec {spec!r}; expected parts joined by '+': {', '.join(_SPEC_FORMS)}")
        kwargs: dict = {}

        def put(key, value, part):
            if key in kwargs:
                raise ValueError(f"emulation spec {spec!r} sets {key} twice (at {part!r}); give each part once")
            kwargs[key] = value

        for part in (p.strip() for p in spec.split("+")):
            head, sep, rest = part.partition(":")
            head = head.strip().lower()
            if part.lower() == "clean":
                continue
            if not part or (sep and not rest.strip()):
                raise ValueError(f"bad part {part!r} in emulation spec {spec!r}; expected one of: {', '.join(_SPEC_FORMS)}")
            if head in ("weights", "weight", "w"):
                put("weight_format", rest.strip(), part)
            elif head in ("inputs", "input", "a"):
                put("input_format", rest.strip(), part)
            elif head == "aqn":
                try:
                    put("aqn_sigma", float(rest), part)
                except ValueError:
                    raise ValueError(f"bad AQN sigma {rest.strip()!r} in {spec!r}; expected a number, e.g. aqn:0.01") from None
            elif head in ("targets", "exclude"):
                put(head, rest, part)  # hwnoise.select.parse_names reads the list
            elif E.is_name(head):
                error, at, where = part.partition("@")
                put("error", error.strip(), part)
                if at:
                    match = _WHERE_PART.match(where)
                    if not match:
                        raise ValueError(f"bad where {where.strip()!r} in {spec!r}; expected one of "
                                         f"{', '.join(EMULATION_WHERE)}, e.g. @ops or @ops[linear,matmul]")
                    kwargs["where"] = match.group(1).lower()
                    if match.group(2) is not None:
                        if kwargs["where"] != "ops":
                            raise ValueError(f"an op list is for @ops only; got {where.strip()!r} in {spec!r} "
                                             "(module-level errors select modules with targets:...)")
                        kwargs["ops"] = match.group(2)  # hwnoise.inject.ops.resolve_ops reads the list
            else:
                raise ValueError(f"unknown part {part!r} in emulation spec {spec!r}; expected one of: "
                                 f"{', '.join(_SPEC_FORMS)}; error models: {', '.join(E.names())}")
        return cls(**kwargs)

    @property
    def is_clean(self) -> bool:
        return self.weight_format is None and self.input_format is None and self.error is None and self.aqn_sigma == 0

    @property
    def spec(self) -> str:
        """The canonical spec string, the setting's identity: ``Emulation.parse(e.spec) == e``."""
        parts = []
        if self.weight_format:
            parts.append(f"weights:{self.weight_format}")
        if self.input_format:
            parts.append(f"inputs:{self.input_format}")
        if self.error:
            ops = ""
            if self.where == "ops" and self.ops != DEFAULT_OPS:
                ops = "[all]" if self.ops == ALL_OPS else f"[{','.join(self.ops)}]"
            parts.append(f"{self.error}@{self.where}{ops}")
        if self.aqn_sigma:
            parts.append(f"aqn:{format_number(self.aqn_sigma)}")
        if self.targets != _DEFAULT_TARGETS:
            parts.append("targets:" + (self.targets if isinstance(self.targets, str) else ",".join(self.targets)))
        if self.exclude:
            parts.append("exclude:" + ",".join(self.exclude))
        return "+".join(parts) or "clean"

    @property
    def label(self) -> str:
        """A short human label for tables and plots."""
        parts = []
        if self.weight_format:
            parts.append(f"W {self.weight_format}")
        if self.input_format:
            parts.append(f"A {self.input_format}")
        if self.error:
            parts.append(f"{self.error.replace(':', ' ')} @{self.where}")
        if self.aqn_sigma:
            parts.append(f"AQN {self.aqn_sigma:g}")
        return " + ".join(parts) or "clean"

    @property
    def scale(self) -> float | None:
        """The error model's numeric scale (the x-axis of accuracy-vs-noise plots), or None."""
        if self.error is None:
            return None
        value = getattr(E.parse(self.error), "scale", None)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ops"], d["exclude"] = list(self.ops), list(self.exclude)
        if not isinstance(self.targets, str):
            d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, data) -> Emulation:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown emulation fields {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)

    # -- applying ------------------------------------------------------------------------------

    @contextmanager
    def applied(self, model: nn.Module, seed: int = 0, step: int = 0, *, grad: bool = False, substep: int = 0):
        """Switch the condition on for the enclosed block; the model is exactly as before on exit.

        grad=False (generation, evaluation): the weight format is applied once, by swapping each
        selected module's weight Parameter for a quantized tensor (the parameters themselves are
        never written). grad=True (a loss forward whose backward follows): the weight format goes
        through straight-through hooks so gradients reach the clean weights, and operator noise
        is also put on the backward GEMMs. substep: tells apart several blocks of one step (e.g.
        the micro-batches of a training step), so that each draws its own noise. Yields an
        ``EmulationStats``.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        for name, value in (("step", step), ("substep", substep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        stats = EmulationStats()
        with ExitStack() as stack:
            if self.weight_format:
                if grad:
                    stack.enter_context(inject(model, E.Quantize(self.weight_format), where="weight",
                                               targets=self.targets, exclude=self.exclude or None,
                                               seed=_derived_seed(seed, step, "weights", substep), measure=False))
                else:
                    stack.enter_context(_quantized_weights(model, self.weight_format, self.targets,
                                                           self.exclude, stats))
            if self.aqn_sigma:
                aqn = AQN(Constant(self.aqn_sigma), seed=_derived_seed(seed, step, "aqn", substep))
                stack.enter_context(aqn.noisy(model, step=0, total_steps=1))
                stats.aqn = aqn
            if self.input_format:
                stats.injections.append(stack.enter_context(
                    inject(model, E.Quantize(self.input_format), where="input", targets=self.targets,
                           exclude=self.exclude or None, seed=_derived_seed(seed, step, "inputs", substep), measure=False)))
            if self.error:
                error = E.parse(self.error)
                if self.where == "ops":
                    stats.ops = stack.enter_context(noisy_ops(error, ops=self.ops, backward=grad,
                                                              seed=_derived_seed(seed, step, "ops", substep)))
                else:
                    stats.injections.append(stack.enter_context(
                        inject(model, error, where=self.where, targets=self.targets, exclude=self.exclude or None,
                               seed=_derived_seed(seed, step, "error", substep))))
            yield stats


class EmulationStats:
    """What an ``applied`` block did, for logging: ``as_dict()`` gives flat numbers."""

    def __init__(self):
        self.weight_sqnr_db: float | None = None
        self.weights_quantized = 0
        self.aqn = None
        self.ops = None
        self.injections: list = []

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.weights_quantized:
            out["weights_quantized"] = float(self.weights_quantized)
            out["weight_sqnr_db"] = float(self.weight_sqnr_db)
        if self.aqn is not None:
            noise = [s.effective_std for s in self.aqn.stats().values()]
            if noise:
                out["aqn_effective_std"] = float(sum(noise) / len(noise))
        if self.ops is not None:
            out["noisy_op_calls"] = float(sum(self.ops.stats().values()))
        rel = [s.relative_error for inj in self.injections for s in inj.stats().values()
               if s.calls and math.isfinite(s.relative_error)]
        if rel:
            out["injected_relative_error"] = float(sum(rel) / len(rel))
        return out


@contextmanager
def _quantized_weights(model: nn.Module, fmt: str, targets, exclude, stats: EmulationStats):
    """Swap each selected module's weight Parameter for its quantized copy; put the originals back.

    The original Parameter objects are restored on exit (also on errors): nothing is written to
    them, so the clean weights come back bit for bit and optimizer state stays attached to them.
    """
    plan = WeightPlan.coerce(fmt) if is_plan_spec(fmt) else None  # per-module formats
    modules = plan.select(model, exclude=exclude) if plan else select_modules(model, targets, exclude=exclude or None)
    swapped: list[tuple[nn.Module, nn.Parameter]] = []
    signal = noise = 0.0
    try:
        with torch.no_grad():
            for name, module in modules.items():
                weight = module._parameters.get("weight")
                if not isinstance(weight, torch.Tensor):
                    continue
                q = quantize(weight.detach(), plan.format_for(name) if plan else fmt)
                diff = (q.float() - weight.float())
                signal += float(weight.float().pow(2).sum())
                noise += float(diff.pow(2).sum())
                swapped.append((module, weight))
                module._parameters["weight"] = nn.Parameter(q, requires_grad=False)
        if not swapped:
            raise ValueError(f"weight format {fmt!r}: no module selected by targets={targets!r} has a weight")
        stats.weights_quantized = len(swapped)
        stats.weight_sqnr_db = 10 * math.log10(signal / noise) if noise > 0 else math.inf
        yield
    finally:
        for module, weight in reversed(swapped):
            module._parameters["weight"] = weight
