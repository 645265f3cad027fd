"""Module-level injection: hooks that put an error on the input, the output or the weight of modules.

``hwnoise.inject(model, error, where="output", targets="linear")`` selects modules with
``hwnoise.select`` and registers hooks on them; the returned ``Injection`` is a context manager
and has ``remove()`` and ``stats()``. Nothing else about the model changes: no copy, no write to
any parameter.

- where="input": a forward pre-hook perturbs the module's first tensor argument (W16A4-style).
- where="output": a forward hook perturbs the result (the first tensor of a tuple result).
- where="weight": for the duration of forward only, ``module.weight`` is a perturbed tensor
  ``error(w)`` whose gradient flows straight through to the original parameter; the parameter
  itself is never written, and an always-called forward hook puts it back also when forward raises.
  Weight injections nest: each one's post-hook is prepended, so the post-hooks run in the reverse
  order of the pre-hooks; an inner injection perturbs what the outer one put there, and every
  module gets its own Parameter back whatever the order of exits.

Every draw is keyed by (seed, module qualified name, "forward", step), step counting the noisy
calls of that module since the handle was made: replays are exact and modules are independent.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ErrorModel, get as get_error, noise_key
from ..select import select_modules
from .keys import StepCounter, perturb
from .phases import check_phase, phase_active
from .swap import set_weight

__all__ = ["WHERE", "Injection", "SiteStats", "inject"]

WHERE = ("input", "output", "weight")
_INPUT_KEYWORDS = ("input", "hidden_states", "x")

# Per module, the weight swaps of forwards in flight, over every injection, bottom first: each
# frame is [original, installed]. Lets remove() undo an interrupted forward in any order.
_IN_FLIGHT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SiteStats:
    """One site's record: noisy calls, and the relative error put there, ||noise|| / ||clean||
    summed over calls (energy-weighted: sqrt(sum ||noise||^2 / sum ||clean||^2))."""

    calls: int
    relative_error: float


class _Site:
    __slots__ = ("name", "module", "sum_noise", "sum_clean", "saved", "error")

    def __init__(self, name, module):
        self.name, self.module = name, module
        self.error = None  # this site's own error model (a per-module weight plan), else the injection's
        self.sum_noise = self.sum_clean = None  # tensors: no device sync until stats()
        # [original, installed] weights of calls in flight: a stack, for re-entrant forwards.
        self.saved = []


def _first_tensor(seq):
    for i, item in enumerate(seq):
        if isinstance(item, torch.Tensor):
            return i
    return None


class Injection:
    """Hooks on the selected modules; ``with`` it, or call ``remove()`` when done."""

    def __init__(self, model: nn.Module, error, where="output", targets="linear", exclude=None, phase="both",
                 seed: int = 0, *, layers=None, measure: bool = True):
        if not isinstance(model, nn.Module):
            raise ValueError(f"inject needs an nn.Module; got {type(model).__name__}")
        if not isinstance(error, ErrorModel):
            error = get_error(error)
        if where not in WHERE:
            raise ValueError(f"unknown where {where!r}; known: {', '.join(WHERE)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        self.error, self.where, self.seed = error, where, seed
        self.phase = check_phase(phase)
        self.measure = measure
        plan = getattr(error, "plan", None)  # a per-module weight plan picks its modules and their formats
        modules = plan.select(model, exclude=exclude) if plan is not None else \
            select_modules(model, targets, layers=layers, exclude=exclude)
        if where == "weight":
            bad = [n for n, m in modules.items() if not isinstance(m._parameters.get("weight"), torch.Tensor)]
            if bad:
                raise ValueError(f"where='weight' needs modules with a weight parameter; these have none: "
                                 f"{', '.join(bad[:5])}")
        self._sites = {name: _Site(name, module) for name, module in modules.items()}
        if plan is not None:
            for name, site in self._sites.items():
                site.error = error.for_site(name)
        self._steps = StepCounter()
        self._handles = []
        for site in self._sites.values():
            self._register(site)

    # -- hooks ---------------------------------------------------------------------------------

    def _register(self, site: _Site) -> None:
        module = site.module
        if self.where == "input":
            self._handles.append(module.register_forward_pre_hook(self._input_hook(site), with_kwargs=True))
        elif self.where == "output":
            self._handles.append(module.register_forward_hook(self._output_hook(site)))
        else:
            self._handles.append(module.register_forward_pre_hook(self._weight_pre_hook(site)))
            # Prepended: post-hooks run last-registered first, so nested weight injections
            # unwind in stack order (each puts back the weight it found).
            self._handles.append(module.register_forward_hook(self._weight_post_hook(site), always_call=True,
                                                              prepend=True))

    def _noisy(self, site: _Site, x: torch.Tensor) -> torch.Tensor:
        step = self._steps.next(site.name)
        y = perturb(x, site.error or self.error, noise_key(self.seed, site.name, "forward", step))
        if self.measure:
            with torch.no_grad():
                noise = torch.linalg.vector_norm((y.detach() - x.detach()).float()) ** 2
                clean = torch.linalg.vector_norm(x.detach().float()) ** 2
                site.sum_noise = noise if site.sum_noise is None else site.sum_noise + noise
                site.sum_clean = clean if site.sum_clean is None else site.sum_clean + clean
        return y

    def _input_hook(self, site):
        def hook(module, args, kwargs):
            if not phase_active(self.phase):
                return None
            i = _first_tensor(args)
            if i is not None:
                args = args[:i] + (self._noisy(site, args[i]),) + args[i + 1:]
                return args, kwargs
            for key in _INPUT_KEYWORDS:
                if isinstance(kwargs.get(key), torch.Tensor):
                    return args, dict(kwargs, **{key: self._noisy(site, kwargs[key])})
            raise TypeError(f"hwnoise.inject(where='input'): {site.name} was called without a tensor input")

        return hook

    def _output_hook(self, site):
        def hook(module, args, output):
            if not phase_active(self.phase):
                return None
            if isinstance(output, torch.Tensor):
                return self._noisy(site, output)
            if isinstance(output, (tuple, list)):
                i = _first_tensor(output)
                if i is not None:
                    items = list(output)
                    items[i] = self._noisy(site, items[i])
                    return type(output)(items) if isinstance(output, list) else tuple(items)
            raise TypeError(f"hwnoise.inject(where='output'): {site.name} returned {type(output).__name__}, "
                            "not a tensor or a tuple holding one")

        return hook

    def _weight_pre_hook(self, site):
        def hook(module, args):
            original = module._parameters["weight"]
            installed = original
            if phase_active(self.phase):
                # A non-leaf stand-in for this forward only; its gradient reaches `original` unchanged.
                installed = self._noisy(site, original)
            frame = [original, installed]
            site.saved.append(frame)
            _IN_FLIGHT.setdefault(module, []).append(frame)
            set_weight(module, installed, as_is=True)
            return None

        return hook

    def _weight_post_hook(self, site):
        def hook(module, args, output):
            if site.saved:
                frame = site.saved.pop()
                set_weight(module, frame[0], as_is=True)
                _forget(module, frame)
            return None

        return hook

    # -- handle ----------------------------------------------------------------------------------

    @property
    def sites(self) -> list[str]:
        """Qualified names of the modules this injection acts on, in model order."""
        return list(self._sites)

    def stats(self) -> dict[str, SiteStats]:
        """Per site (qualified module name): noisy calls and the measured relative error."""
        counts = self._steps.counts()
        out = {}
        for name, site in self._sites.items():
            if site.sum_clean is None:
                rel = float("nan")
            else:
                clean = float(site.sum_clean)
                rel = (float(site.sum_noise) / clean) ** 0.5 if clean > 0 else float("nan")
            out[name] = SiteStats(calls=counts.get(name, 0), relative_error=rel)
        return out

    def remove(self) -> None:
        """Remove every hook (idempotent). The model is as it was before ``inject``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for site in self._sites.values():  # a forward interrupted without its post-hook
            for frame in reversed(site.saved):
                frames = _IN_FLIGHT.get(site.module, [])
                above = [i for i, f in enumerate(frames) if f is frame]
                if above and above[0] + 1 < len(frames):
                    # Another injection's swap lies on top: it will put back our original.
                    frames[above[0] + 1][0] = frame[0]
                else:
                    set_weight(site.module, frame[0], as_is=True)
                _forget(site.module, frame)
            site.saved.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        return (f"Injection({self.error!r}, where={self.where!r}, sites={len(self._sites)}, phase={self.phase!r}, "
                f"seed={self.seed}, active={self.active})")


def _forget(module: nn.Module, frame: list) -> None:
    frames = _IN_FLIGHT.get(module)
    if frames is None:
        return
    frames[:] = [f for f in frames if f is not frame]
    if not frames:
        del _IN_FLIGHT[module]


def inject(model: nn.Module, error, where: str = "output", targets="linear", exclude=None, phase: str = "both",
           seed: int = 0, *, layers=None, measure: bool = True) -> Injection:
    """Put ``error`` on the input, output or weight of the modules ``targets`` selects.

    targets / layers / exclude: as ``hwnoise.select.select_modules`` ("linear", "rmsnorm",
    "attention", "mlp", name globs; lm_head, embed_tokens and LoRA A/B are excluded unless a target
    names them, e.g. ``targets=["linear", "lm_head"]``; a bare module is its own candidate).
    phase: "both", or "rollout"/"training" to act only inside ``hwnoise.phase(...)`` blocks.
    measure: keep ||noise|| and ||clean|| per site for ``stats()`` (two reductions per call).
    Returns an ``Injection``: a context manager with ``remove()`` and ``stats()``.
    """
    return Injection(model, error, where=where, targets=targets, exclude=exclude, phase=phase, seed=seed,
                     layers=layers, measure=measure)
