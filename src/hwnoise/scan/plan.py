"""Mixed-precision plan search: which modules to buy precision back for, measured.

Starting from every scanned module in the scan's format, the search ranks the possible upgrades
(module m from format a to a wider format b) by measured effect per bit,

    score = (solo effect of m in a - solo effect of m in b) / ((bits_b - bits_a) * weights of m),

the solo effects being the scan's end-to-end measurements (one module quantized, the rest clean;
a format of 16 bits or more is taken as effect 0 and not measured), then applies the upgrades in
that order and re-measures the *joint* effect (every module in its planned format at once) along
the way. Errors interact, so the sum of solo effects is never used as a point of the curve: every
point of the Pareto table is one forward pass with that whole plan in place.

Points are measured after each of the first ``each`` upgrades, then at prefix lengths growing by
``growth`` up to the last upgrade (every module in the widest format), then bisected between the
two measured points around the target. Cost, with M modules, F candidate formats and P points:
(F - 2) * M solo passes (cheap: the decoder layers before the module are cached; 0 for the default
base + bf16) + P full forwards + 3 on the held-out texts (+ 1 + 5 for the scale-mode check).

Effective bits per weight: each format's ``bits_per_value`` (scale overhead included; bf16 = 16)
weighted by each module's weight count, over the scanned modules.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..formats.fake_quant import options_for, quantize, saturation_mask
from ..formats.registry import get, names
from ..plans import REFERENCE_BITS
from ..progress import ProgressCallback, progress_reporter
from ..select import decoder_layer_index
from ..inject.swap import swapped_weights

__all__ = ["DEFAULT_EACH", "DEFAULT_GROWTH", "PlanResult", "check_plan_targets", "parse_candidates", "search_plan",
           "split_candidates"]

DEFAULT_EACH = 8       # measure the joint effect after each of the first 8 upgrades
DEFAULT_GROWTH = 1.3   # then at prefix lengths growing by 30 %: about 22 points for 211 modules
SCALE_CHECK_MODULES = 5  # saturation-dominated modules re-measured with the rceil variant
SATURATION_DOMINATES = 0.5  # share of a module's error energy from clipped values


def _bits(spec: str) -> float:
    return float(get(spec).bits_per_value)


def split_candidates(text: str) -> list[str]:
    """"mxfp6_e2m3,mxfp8:rceil,rounding=stochastic,bf16" -> the three formats: a comma starts a new
    candidate only where a format name follows (a format's own options, "rceil" or "key=value",
    stay with it)."""
    known = {n.lower() for n in names()}
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        head = piece.partition(":")[0].strip().lower()
        if out and ":" in out[-1] and ("=" in head or head not in known):
            out[-1] = f"{out[-1]},{piece}"  # an option of the previous candidate's format
        else:
            out.append(piece)
    return out


def parse_candidates(candidates, base: str) -> list[str]:
    """The candidate formats, base first, by increasing bits; "a,b,c" or a sequence. Each must be
    a known format with more bits per weight than ``base`` (the plan buys precision back).

    Args:
        candidates: None or True (the default: base + bf16), "a,b,c" (a comma inside a format's
            options stays with it: "mxfp8:rceil,rounding=stochastic,bf16"), or a sequence.
        base: the scan's format.

    Example:
        >>> parse_candidates("bf16", "mxfp4")
        ['mxfp4', 'bf16']
    """
    if candidates is None or candidates is True:
        items = [base, "bf16"]
    elif isinstance(candidates, str):
        if not candidates.strip():
            raise ValueError("--plan '' names no candidate formats; give formats wider than the scan's, e.g. "
                             "--plan bf16 or --plan mxfp6_e2m3,mxfp8_e4m3,bf16")
        items = split_candidates(candidates)
    else:
        items = [str(c).strip() for c in candidates]
    base_bits = _bits(base)
    out = [base]
    for spec in items:
        get(spec)  # unknown format -> ValueError naming the known ones
        if spec == base or spec in out:
            continue
        if _bits(spec) <= base_bits:
            raise ValueError(f"plan candidate {spec!r} has {_bits(spec):g} bits per weight, not more than the scan's "
                             f"format {base!r} ({base_bits:g}); the plan buys precision back from {base!r}, so give "
                             f"wider formats, e.g. mxfp6_e2m3, mxfp8_e4m3, bf16")
        out.append(spec)
    if len(out) < 2:
        raise ValueError(f"the plan needs at least one candidate format wider than {base!r} (e.g. bf16); got {candidates!r}")
    return [out[0]] + sorted(out[1:], key=_bits)


def check_plan_targets(target_kl=None, target_loss=None, budget_bits=None, candidates=None, base: str | None = None):
    """Refuse bad plan targets before any work: more than one, not finite or negative, a bit budget
    below the cheapest candidate (every module in ``base``) or above the widest.

    Args:
        target_kl, target_loss, budget_bits: the plan target (at most one).
        candidates, base: as ``parse_candidates`` (for the bit budget's range).

    Example:
        >>> check_plan_targets(budget_bits=8.25, candidates="bf16", base="mxfp4")
    """
    given = [(k, v) for k, v in (("--target-kl", target_kl), ("--target-loss", target_loss),
                                 ("--budget-bits", budget_bits)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one plan target, not {' and '.join(k for k, _ in given)}")
    for name, value in given:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"plan target {name} {value!r} is not accepted; give a finite number >= 0")
    if budget_bits is not None and base is not None:
        cands = parse_candidates(candidates, base)
        low, high = min(_bits(c) for c in cands), max(_bits(c) for c in cands)
        if budget_bits < low:
            raise ValueError(f"--budget-bits {budget_bits:g} is below the cheapest plan: every module in {cands[0]} "
                             f"takes {low:g} effective bits per weight; give --budget-bits between {low:g} and "
                             f"{high:g} (candidates: {', '.join(cands)})")


@dataclass
class PlanResult:
    """The plan search's result (data first): the ranked upgrades, every measured point, the plan chosen."""

    base: str
    candidates: list[str]
    rank_by: str                  # "kl" or "loss_increase": the solo effect the ranking uses
    target: dict                  # {"kind": "kl" | "loss" | "bits", "value": float, "default": bool}
    total_weights: int
    numel: dict                   # module -> weight count (for effective bits)
    changes: list[dict]           # ranked upgrades: module, from, to, score, solo_from, solo_to
    points: list[dict]            # measured: changes (prefix length), effective_bits, loss_increase, kl, pareto
    chosen: int | None            # index into points of the plan
    met: bool                     # whether the chosen point meets the target
    formats: dict                 # the plan: module -> format spec
    held_out: dict | None = None  # the plan re-measured on texts not used to choose it
    scale_mode: dict | None = None
    cost: dict = field(default_factory=dict)

    # -- queries ------------------------------------------------------------------------------

    def formats_at(self, k: int) -> dict[str, str]:
        """The plan after the first ``k`` upgrades."""
        plan = {name: self.base for name in self.numel}
        for change in self.changes[:k]:
            plan[change["module"]] = change["to"]
        return plan

    @property
    def chosen_point(self) -> dict | None:
        return None if self.chosen is None else self.points[self.chosen]

    @property
    def whole_model(self) -> dict:
        return self.points[0]

    def upgraded(self) -> dict[str, list[str]]:
        """Format -> the modules the plan puts in it (other than the base), widest first."""
        out: dict[str, list[str]] = {}
        for name, spec in self.formats.items():
            if spec != self.base:
                out.setdefault(spec, []).append(name)
        return dict(sorted(out.items(), key=lambda kv: -_bits(kv[0])))

    def sigma_multipliers(self) -> dict:
        """AQN multipliers derived from the plan: per decoder layer, the square root of the weight
        error energy left by the plan over that of the all-base model (1: nothing bought back, 0:
        the whole layer in full precision); the layers with any error left are targeted."""
        energy = self.cost.get("noise_energy") or {}
        left: dict[int, float] = {}
        full: dict[int, float] = {}
        for name, spec in self.formats.items():
            layer = decoder_layer_index(name)
            if layer is None or name not in energy:
                continue
            full[layer] = full.get(layer, 0.0) + energy[name].get(self.base, 0.0)
            left[layer] = left.get(layer, 0.0) + energy[name].get(spec, 0.0)
        mult = {k: (math.sqrt(left[k] / full[k]) if full[k] > 0 else 0.0) for k in sorted(full)}
        return {"layer_multipliers": {str(k): round(v, 4) for k, v in mult.items()}, "default_multiplier": 1.0,
                "targeted": [k for k, v in mult.items() if v > 0]}

    def recommendation(self) -> list[str]:
        """The recommendation in words, from the measured plan."""
        p0, pc = self.whole_model, self.chosen_point
        kind = {"kl": "KL", "loss": "loss increase", "bits": "effective bits"}[self.target["kind"]]
        target = (f"{kind} <= {self.target['value']:.4g}" + (" (default: a third of the whole-model KL)"
                                                              if self.target.get("default") else ""))
        if pc is None:
            return [f"No measured plan meets {target}; the Pareto table in scan.json lists what was measured."]
        groups = self.upgraded()
        if not groups:
            what = f"all {len(self.numel)} modules stay in {self.base}"
        else:
            parts = []
            for spec, names in groups.items():
                share = 100 * sum(self.numel[n] for n in names) / self.total_weights
                parts.append(f"{len(names)} module{'s' if len(names) != 1 else ''} ({share:.1f} % of weights) in "
                             f"{spec.upper() if spec.islower() else spec}")
            what = "keep " + " and ".join(parts) + f", the rest in {self.base}"
        head = (f"Mixed-precision plan for {target}: {what}: loss increase {p0['loss_increase']:+.2f} -> "
                f"{pc['loss_increase']:+.2f} nats/token, KL {p0['kl']:.3f} -> {pc['kl']:.3f}, at "
                f"{pc['effective_bits']:.2f} effective bits per weight (all-{self.base}: {p0['effective_bits']:.2f}).")
        out = [head if self.met else head + " It does not meet the target (the closest measured plan)."]
        if groups:
            first = [c["module"] for c in self.changes[:min(pc["changes"], 3)]]
            out.append(f"First bought back: {', '.join(first)}. Every point of the Pareto table was measured with "
                       f"the whole plan in place ({len(self.points)} points); plan.json holds the plan.")
        if self.held_out:
            h = self.held_out
            out.append(f"On {h['texts']} held-out texts not used to choose it: loss increase "
                       f"{h['base']['loss_increase']:+.3f} (all-{self.base}) -> {h['plan']['loss_increase']:+.3f} "
                       f"(plan), KL {h['base']['kl']:.3f} -> {h['plan']['kl']:.3f}.")
        if self.scale_mode and self.scale_mode.get("verdict"):
            out.append(self.scale_mode["verdict"])
        return out

    # -- data ---------------------------------------------------------------------------------

    def to_json(self) -> dict:
        d = asdict(self)
        d["pareto"] = [p for p in self.points if p.get("pareto")]
        d["cost"] = {k: v for k, v in self.cost.items() if k != "noise_energy"}
        d["noise_energy"] = self.cost.get("noise_energy")
        d["recommendation"] = self.recommendation()
        return d

    @classmethod
    def from_json(cls, data: dict) -> "PlanResult":
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["cost"] = dict(kwargs.get("cost") or {}, noise_energy=data.get("noise_energy"))
        return cls(**kwargs)


def _mark_pareto(points: list[dict]) -> None:
    """A point is on the Pareto front when no other point has fewer (or equal) bits and a lower
    (or equal) effect, one of them strictly. Effect: the point's KL."""
    for p in points:
        p["pareto"] = not any(
            q is not p and q["effective_bits"] <= p["effective_bits"] and q["kl"] <= p["kl"]
            and (q["effective_bits"] < p["effective_bits"] or q["kl"] < p["kl"]) for q in points)


def _schedule(total: int, each: int, growth: float) -> list[int]:
    ks, k = list(range(0, min(each, total) + 1)), min(each, total)
    while k < total:
        k = min(total, max(k + 1, int(math.ceil(k * growth))))
        ks.append(k)
    return ks


def search_plan(
    modules: dict[str, nn.Module],
    clean,                      # calibration.CleanPass on the texts that choose the plan
    base: str,
    candidates,
    solo: dict[str, tuple[float, float]],
    *,
    quantized: dict[str, torch.Tensor] | None = None,
    target_kl: float | None = None,
    target_loss: float | None = None,
    budget_bits: float | None = None,
    held_out=None,              # a CleanPass on held-out texts, or None
    each: int = DEFAULT_EACH,
    growth: float = DEFAULT_GROWTH,
    scale_check: bool = True,
    saturation_threshold: float = 0.01,
    on_progress: ProgressCallback | None = None,
    report: Callable[[str, str, int, int], None] | None = None,
) -> PlanResult:
    """Search a format per module (see the module docstring). ``solo``: module -> (loss increase,
    KL) with only that module in ``base`` (the scan's end-to-end effects). ``quantized``: the base
    format's weights already computed by the scan (reused, not recomputed). on_progress(label, done,
    total): after each solo pass ("plan <format> <module>", done of the modules) and each joint
    pass ("plan joint <k> of <n> upgrades", done of the points measured so far, of the upgrades).
    ``report``: a ``progress_reporter`` the caller (``scan``) already built, used instead."""
    if report is None:
        report = progress_reporter(on_progress, what="search_plan")
    t0 = time.perf_counter()
    given = [(k, v) for k, v in (("kl", target_kl), ("loss", target_loss), ("bits", budget_bits)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one plan target, not {len(given)}: --target-kl, --target-loss or --budget-bits")
    for kind, value in given:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"plan target {kind}={value!r} must be a finite number >= 0")
    if isinstance(each, bool) or not isinstance(each, int) or each < 1:
        raise ValueError(f"each={each!r}: measure after each of the first N upgrades needs an integer N >= 1")
    if not (isinstance(growth, (int, float)) and growth > 1):
        raise ValueError(f"growth={growth!r} must be a number > 1")
    cands = parse_candidates(candidates, base)
    missing = [n for n in modules if n not in solo or solo[n][1] is None]
    if missing:
        raise ValueError(f"the plan needs the end-to-end effect of every module (end_to_end=True); missing for "
                         f"{', '.join(missing[:3])}")
    numel = {n: int(m.weight.numel()) for n, m in modules.items()}
    total = sum(numel.values())
    rank_by = "loss_increase" if given and given[0][0] == "loss" else "kl"
    bits = {s: _bits(s) for s in cands}
    passes = {"solo": 0, "joint": 0, "held_out": 0, "scale_mode": 0}

    cache: dict[tuple[str, str], torch.Tensor] = {}
    if quantized:
        cache.update({(n, base): w for n, w in quantized.items()})
    energy: dict[str, dict[str, float]] = {n: {} for n in modules}

    resolved: dict[str, object] = {}  # spec string -> FormatSpec: each resolved once per search

    def weight(name: str, spec: str) -> torch.Tensor:
        key = (name, spec)
        if key not in cache:
            if spec not in resolved:
                resolved[spec] = get(spec)
            with torch.inference_mode():
                cache[key] = quantize(modules[name].weight.detach(), resolved[spec])
        if spec not in energy[name]:
            with torch.inference_mode():
                w = modules[name].weight.detach().float()
                energy[name][spec] = float((cache[key].float() - w).pow(2).sum().double())
        return cache[key]

    def swapped(plan: dict[str, str]):
        def change():
            return swapped_weights((modules[name], weight(name, spec)) for name, spec in plan.items())
        return change

    def joint(plan: dict[str, str], where=clean, what="joint") -> dict:
        loss, kl = where.effect("", None, swapped(plan))
        passes[what] += 1
        return {"loss_increase": loss, "kl": kl}

    def effective_bits(plan: dict[str, str]) -> float:
        return sum(numel[n] * bits[s] for n, s in plan.items()) / total

    # 1. Solo effects per candidate (base: the scan's; >= 16 bits: 0, not measured).
    effect = {n: {base: solo[n][1] if rank_by == "kl" else solo[n][0]} for n in modules}
    for spec in cands[1:]:
        for done, name in enumerate(modules, 1):
            if bits[spec] >= REFERENCE_BITS:
                effect[name][spec] = 0.0
                continue
            loss, kl = clean.effect(name, decoder_layer_index(name), swapped({name: spec}))
            passes["solo"] += 1
            effect[name][spec] = kl if rank_by == "kl" else loss
            report(f"plan {spec}", name, done, len(modules))

    # 2. Rank: per module a chain of upgrades (best gain per bit from where it is), merged by a heap.
    def next_upgrade(name: str, current: str):
        wider = [s for s in cands if bits[s] > bits[current]]
        if not wider:
            return None
        gain = {s: (effect[name][current] - effect[name][s]) / ((bits[s] - bits[current]) * numel[name]) for s in wider}
        best = max(wider, key=lambda s: (gain[s], bits[s]))
        return gain[best], best

    heap = []
    for order, name in enumerate(modules):
        up = next_upgrade(name, base)
        if up:
            heapq.heappush(heap, (-up[0], order, name, base, up[1]))
    changes = []
    while heap:
        neg, order, name, frm, to = heapq.heappop(heap)
        changes.append({"module": name, "from": frm, "to": to, "score": -neg,
                        "solo_from": effect[name][frm], "solo_to": effect[name][to], "numel": numel[name]})
        up = next_upgrade(name, to)
        if up:
            heapq.heappush(heap, (-up[0], order, name, to, up[1]))

    # 3. Measure the joint effect along the ranking.
    points: dict[int, dict] = {}

    def formats_at(k: int) -> dict[str, str]:
        plan = {n: base for n in modules}
        for c in changes[:k]:
            plan[c["module"]] = c["to"]
        return plan

    def measure(k: int) -> dict:
        if k not in points:
            plan = formats_at(k)
            point = {"changes": k, "effective_bits": effective_bits(plan), **joint(plan)}
            if k:
                point["last"] = f"{changes[k - 1]['module']} -> {changes[k - 1]['to']}"
            points[k] = point
            report("plan joint", f"{k} of {len(changes)} upgrades", k, len(changes))
        return points[k]

    for k in _schedule(len(changes), each, growth):
        measure(k)
    whole = points[0]
    if not given:
        kind, value, default = "kl", whole["kl"] / 3, True
    else:
        (kind, value), default = given[0], False
    metric = {"kl": "kl", "loss": "loss_increase"}.get(kind)

    def meets(p: dict) -> bool:
        return p["effective_bits"] <= value + 1e-12 if kind == "bits" else p[metric] <= value

    # 4. Refine around the target: bisect between the last measured prefix that misses it and the first that meets it.
    if kind == "bits":
        within = [k for k in range(len(changes) + 1) if effective_bits(formats_at(k)) <= value + 1e-12]
        if within:
            measure(max(within))
    else:
        for _ in range(12):
            ks = sorted(points)
            hit = next((k for k in ks if meets(points[k])), None)
            if hit is None or hit == 0:
                break
            lo = max(k for k in ks if k < hit)
            if hit - lo <= 1:
                break
            measure((lo + hit) // 2)
    ordered = [points[k] for k in sorted(points)]
    _mark_pareto(ordered)
    ok = [i for i, p in enumerate(ordered) if meets(p)]
    if kind == "bits":
        chosen = min(ok, key=lambda i: (ordered[i]["kl"], ordered[i]["effective_bits"])) if ok else None
    else:
        chosen = min(ok, key=lambda i: (ordered[i]["effective_bits"], ordered[i]["kl"])) if ok else None
    met = chosen is not None
    if chosen is None:  # the closest measured point
        chosen = min(range(len(ordered)), key=lambda i: ordered[i]["effective_bits"]) if kind == "bits" else \
            min(range(len(ordered)), key=lambda i: ordered[i][metric])
    plan = formats_at(ordered[chosen]["changes"])
    t_search = time.perf_counter() - t0

    # 5. Held-out re-measurement.
    held = None
    if held_out is not None:
        held = {"texts": int(held_out.calibration.input_ids.shape[0]), "tokens": held_out.calibration.tokens,
                "clean_loss": held_out.clean_loss,
                "base": joint({n: base for n in modules}, held_out, "held_out"),
                "plan": joint(plan, held_out, "held_out")}
        passes["held_out"] += 1  # its clean pass

    result = PlanResult(base=base, candidates=cands, rank_by=rank_by,
                        target={"kind": kind, "value": value, "default": default}, total_weights=total,
                        numel=numel, changes=changes, points=ordered, chosen=chosen, met=met, formats=plan,
                        held_out=held)
    t1 = time.perf_counter()
    if scale_check:
        result.scale_mode = _scale_mode_check(modules, clean, base, solo, whole, weight, swapped, passes,
                                              saturation_threshold)
    for name in modules:  # energies of every candidate, for the AQN multipliers
        for spec in {base, plan[name]}:
            if spec not in energy[name]:
                weight(name, spec)
    result.cost = {"forward_passes": dict(passes, total=sum(passes.values())),
                   "seconds": {"search": round(t_search, 3), "scale_mode": round(time.perf_counter() - t1, 3),
                               "total": round(time.perf_counter() - t0, 3)},
                   "noise_energy": energy}
    cache.clear()
    return result


def _scale_mode_check(modules, clean, base, solo, whole, weight, swapped, passes, saturation_threshold) -> dict | None:
    """When saturation (values clipped by OCP floor scales) dominates a module's error, re-measure
    with the ``:rceil`` variant: the modules most dominated, alone, and the whole model."""
    spec = get(base)
    if spec.family != "mx" or spec.scale_mode != "floor":
        return None
    rceil = f"{base}:rceil"
    try:
        get(rceil)
    except ValueError:
        return None
    rows = []
    with torch.inference_mode():
        for name, module in modules.items():
            x = module.weight.detach()
            o = options_for(x, spec)
            y = weight(name, base).float()
            err = (x.float() - y).pow(2)
            sat = saturation_mask(x, o)
            total = float(err.sum().double())
            clipped = float(err[sat].sum().double()) if total > 0 else 0.0
            rows.append({"module": name, "saturation_ratio": float(sat.float().mean()),
                         "clip_error_share": clipped / total if total > 0 else 0.0, "noise": total})
    saturating = [r for r in rows if r["saturation_ratio"] > saturation_threshold]
    dominated = sorted((r for r in rows if r["clip_error_share"] > SATURATION_DOMINATES),
                       key=lambda r: -r["clip_error_share"])
    out = {"base": base, "variant": rceil, "modules_saturating": len(saturating),
           "modules_saturation_dominated": len(dominated),
           "clip_error_share_overall": sum(r["clip_error_share"] * r["noise"] for r in rows) /
                                       max(sum(r["noise"] for r in rows), 1e-300)}
    checked = []
    for r in dominated[:SCALE_CHECK_MODULES]:
        name = r["module"]
        loss, kl = clean.effect(name, decoder_layer_index(name), swapped({name: rceil}))
        passes["scale_mode"] += 1
        w = modules[name].weight.detach().float()
        noise_r = float((weight(name, rceil).float() - w).pow(2).sum().double())
        checked.append({"module": name, "clip_error_share": r["clip_error_share"],
                        "noise_ratio_rceil": noise_r / r["noise"] if r["noise"] else math.nan,
                        "kl": solo[name][1], "kl_rceil": kl, "loss_increase": solo[name][0], "loss_increase_rceil": loss})
    out["checked"] = checked
    loss, kl = clean.effect("", None, swapped({n: rceil for n in modules}))
    passes["scale_mode"] += 1
    out["whole_model"] = {"floor": {"loss_increase": whole["loss_increase"], "kl": whole["kl"]},
                          "rceil": {"loss_increase": loss, "kl": kl}}
    share = 100 * out["clip_error_share_overall"]
    if not dominated:
        head = (f"Scale mode: clipped values carry {share:.1f} % of the {base} weight error and dominate no module's "
                f"error")
    else:
        better = sum(1 for c in checked if c["kl_rceil"] < c["kl"])
        head = (f"Scale mode: saturation (OCP floor scales clip) dominates the error of {len(dominated)} module(s) "
                f"({share:.1f} % of all {base} weight error); re-measured with {rceil}, {better} of the "
                f"{len(checked)} worst have a lower KL alone")
    out["rceil_helps"] = kl < whole["kl"]
    out["verdict"] = (f"{head}. With every module in {rceil} (no clipping) the whole-model KL is {kl:.3f} against "
                      f"{whole['kl']:.3f} with floor scales (loss increase {loss:+.3f} against "
                      f"{whole['loss_increase']:+.3f}): " +
                      (f"{rceil} removes that loss." if kl < whole["kl"] else
                       f"{rceil} does not help; its coarser scale costs the other values more than clipping did."))
    return out


def candidates_label(candidates: Sequence[str]) -> str:
    return ", ".join(candidates)
