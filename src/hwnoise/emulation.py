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
from .inject.keys import StepCounter, perturb
from .inject.ops import ALL_OPS, DEFAULT_OPS, noisy_ops, resolve_ops
from .inject.swap import quantized_input, quantized_weight, swapped_weights
from .plans import WeightPlan, is_plan_spec, looks_like_path, resolve_weights
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


_EXPONENT_PLUS = re.compile(r"e\+0*(\d)")
# A number written with an exponent sign '+' (1e+06): '+' joins spec parts, so it is written 1e6.
_NUMBER_WITH_PLUS = re.compile(r"(?<![A-Za-z_0-9.])(?:\d+\.?\d*|\.\d+)[eE]\+\d+")


def format_number(value: float) -> str:
    """A float as emulation specs write it: short (``0.01``, ``1e-05``) but exact (it parses back
    to the same float), and never with a ``+`` (the part separator): ``1e6``, not ``1e+06``.

    Args:
        value: the number.

    Example:
        >>> format_number(1e6), format_number(0.01)
        ('1e6', '0.01')
    """
    short = f"{value:g}"
    text = short if float(short) == value else repr(float(value))
    return _EXPONENT_PLUS.sub(r"e\1", text)


def _canonical_error(text: str) -> str:
    """An error spec with every number written as ``format_number`` writes it where it held a '+'."""
    return _NUMBER_WITH_PLUS.sub(lambda m: format_number(float(m.group(0))), text)


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
        # Parsed once: the resolved parts (a FormatSpec or WeightPlan, a FormatSpec, an ErrorModel)
        # live beside the fields; everything that applies or measures the condition uses them.
        weights = inputs = error_model = None
        for name in ("weight_format", "input_format"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{name} must be a format name such as 'mxfp4'; got {value!r}")
                if name == "weight_format":  # a format, or a per-module plan (plan.json from `hwnoise scan --plan`)
                    weights = resolve_weights(value.strip())
                else:
                    if is_plan_spec(value) or looks_like_path(value):
                        raise ValueError(f"inputs:{value.strip()}: a plan chooses weight formats per module "
                                         f"(weights:plan.json); inputs take one format, e.g. inputs:mxfp4")
                    inputs = get_format(value.strip())  # unknown formats fail here, listing the known ones
                object.__setattr__(self, name, value.strip())
        if self.error is not None:
            text = self.error if isinstance(self.error, str) else None
            if not text or not text.strip():
                raise ValueError(f"error must be an error spec such as 'relative:0.05'; got {self.error!r}")
            error_model = E.parse(text)  # unknown models or bad scales fail here, naming what is accepted
            object.__setattr__(self, "error", _canonical_error(text.strip()))
        object.__setattr__(self, "_weights", weights)
        object.__setattr__(self, "_inputs", inputs)
        object.__setattr__(self, "_error", error_model)
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
        # targets/exclude select modules for the weight format, the input format and module-level
        # errors. Given where none of those reads them they would do nothing: refused, not dropped.
        plan = isinstance(weights, WeightPlan)
        module_error = self.error is not None and self.where != "ops"
        reads_targets = (self.weight_format and not plan) or self.input_format or module_error
        reads_exclude = self.weight_format or self.input_format or module_error
        if self.targets != _DEFAULT_TARGETS and not reads_targets:
            raise ValueError(f"targets:{self.targets if isinstance(self.targets, str) else ','.join(self.targets)} "
                             f"selects nothing here: {self._targetless()} (targets select the modules of "
                             f"weights:FMT, inputs:FMT and module-level errors such as absolute:1e-3@output)")
        if self.exclude and not reads_exclude:
            raise ValueError(f"exclude:{','.join(self.exclude)} leaves out nothing here: {self._targetless()} "
                             f"(exclude is for weights:..., inputs:FMT and module-level errors such as "
                             f"absolute:1e-3@output)")

    def _targetless(self) -> str:
        parts = []
        if isinstance(self._weights, WeightPlan):
            parts.append(f"the plan {self.weight_format} names its own modules (leave some out with exclude:G1,G2)")
        if self.error is not None and self.where == "ops":
            parts.append(f"operator noise {self.error}@ops reaches every op of the model, not modules "
                         f"(choose ops with @ops[linear,matmul], or put it on modules with @output)")
        if self.aqn_sigma:
            parts.append(f"aqn:{format_number(self.aqn_sigma)} puts noise on every RMSNorm weight")
        if not parts:
            parts.append("nothing in the spec selects modules")
        return "; ".join(parts)

    # -- the resolved parts ----------------------------------------------------------------------

    @property
    def weights(self):
        """The weight part, resolved: a ``FormatSpec``, a ``WeightPlan`` (per-module formats), or None."""
        return self._weights

    @property
    def inputs(self):
        """The input part, resolved: a ``FormatSpec`` or None."""
        return self._inputs

    @property
    def error_model(self):
        """The error part, resolved: an ``hwnoise.errors.ErrorModel`` or None."""
        return self._error

    def weight_spec_for(self, name: str):
        """The resolved format module ``name``'s weight takes (a plan's entry, else the one format;
        None: a plan that does not name it, or no weight part)."""
        if isinstance(self._weights, WeightPlan):
            return self._weights.spec_for(name)
        return self._weights

    def weight_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules the weight part acts on (a plan's own modules, else targets/exclude)."""
        if isinstance(self._weights, WeightPlan):
            return self._weights.select(model, exclude=self.exclude)
        return select_modules(model, self.targets, exclude=self.exclude or None)

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
        value = getattr(self._error, "scale", None)
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
                if grad:  # the straight-through path: gradients reach the clean weights
                    stack.enter_context(inject(model, E.Quantize(self._weights), where="weight",
                                               targets=self.targets, exclude=self.exclude or None,
                                               seed=_derived_seed(seed, step, "weights", substep), measure=False))
                else:
                    stack.enter_context(self._quantized_weights(model, stats))
            if self.aqn_sigma:
                aqn = AQN(Constant(self.aqn_sigma), seed=_derived_seed(seed, step, "aqn", substep))
                stack.enter_context(aqn.noisy(model, step=0, total_steps=1))
                stats.aqn = aqn
            if self.input_format:
                stack.enter_context(self._quantized_inputs(model, _derived_seed(seed, step, "inputs", substep)))
            if self.error:
                error = self._error
                if self.where == "ops":
                    stats.ops = stack.enter_context(noisy_ops(error, ops=self.ops, backward=grad,
                                                              seed=_derived_seed(seed, step, "ops", substep)))
                else:
                    stats.injections.append(stack.enter_context(
                        inject(model, error, where=self.where, targets=self.targets, exclude=self.exclude or None,
                               seed=_derived_seed(seed, step, "error", substep))))
            yield stats

    def _quantized_weights(self, model: nn.Module, stats: EmulationStats):
        """Each selected module's weight swapped for its quantized copy (``hwnoise.inject.swap``);
        the original Parameters come back on exit, bit for bit."""
        modules = self.weight_modules(model)
        with_weight = [(n, m) for n, m in modules.items() if isinstance(m._parameters.get("weight"), torch.Tensor)]
        if not with_weight:
            raise ValueError(f"weight format {self.weight_format!r}: no module selected by targets={self.targets!r} "
                             f"has a weight")
        energy = [0.0, 0.0]

        def pairs():
            for name, module in with_weight:
                weight = module._parameters["weight"]
                q = quantized_weight(weight, self.weight_spec_for(name))
                with torch.no_grad():
                    energy[0] += float(weight.float().pow(2).sum())
                    energy[1] += float((q.float() - weight.float()).pow(2).sum())
                yield module, q

        @contextmanager
        def block():
            with swapped_weights(pairs()):
                signal, noise = energy
                stats.weights_quantized = len(with_weight)
                stats.weight_sqnr_db = 10 * math.log10(signal / noise) if noise > 0 else math.inf
                yield

        return block()

    def _quantized_inputs(self, model: nn.Module, seed: int):
        """The selected modules' inputs quantized (``hwnoise.inject.swap``); each call keyed by
        (seed, module, call index), stochastic rounding included; straight-through under autograd."""
        modules = select_modules(model, self.targets, exclude=self.exclude or None)
        model_error = E.Quantize(self._inputs)
        steps = StepCounter()

        def quantizer(x, name):
            return perturb(x, model_error, E.noise_key(seed, name, "forward", steps.next(name)))

        return quantized_input(modules, quantizer)


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
