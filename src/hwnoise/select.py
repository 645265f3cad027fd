"""Which modules: layer types ("linear", "rmsnorm"), blocks ("attention", "mlp", "experts"), name
globs, decoder-layer indices, excludes.

Every noise tool (``inject``, ``aqn``, ``scan``) picks its modules here, so that "rmsnorm" or
"layers 14-17" means the same thing everywhere. Results are keyed by fully qualified module
name (``model.layers.14.input_layernorm``), in the model's own order.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from torch import nn

__all__ = [
    "BLOCK_TYPES",
    "DEFAULT_EXCLUDE",
    "LAYER_TYPES",
    "decoder_layer_index",
    "decoder_layer_indices",
    "format_layer_range",
    "is_attention",
    "is_experts",
    "is_linear",
    "is_mlp",
    "is_rmsnorm",
    "matches_name",
    "parse_layers",
    "parse_names",
    "select_modules",
]

# Never noised unless named: the vocabulary projections and LoRA adapters (the trainable part).
# A name-glob target that spells one of these out (``"lm_head"``, ``"*.lora_A"``) selects it.
DEFAULT_EXCLUDE = ("lm_head", "embed_tokens", "lora_A", "lora_B")

# "layers.N" (Llama, Qwen, Mistral), "h.N" (GPT-2, Falcon), "blocks.N" (many research codebases).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")
_NAMES_SHOWN = 6


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and linear-like classes (vLLM's parallel linears) owning a 2-D weight."""
    if isinstance(module, nn.Linear):
        return True
    # Only a weight registered on the module itself: PEFT wrappers expose the base weight
    # through a property and would otherwise be selected twice.
    weight = module._parameters.get("weight")
    return "Linear" in type(module).__name__ and weight is not None and weight.dim() == 2


def is_rmsnorm(module: nn.Module) -> bool:
    """True for RMSNorm-like modules, matched by duck typing rather than one class.

    A 1-D ``weight`` registered on the module, no bias, and either "RMSNorm" in the class name
    or an epsilon attribute (``variance_epsilon`` as in transformers, ``eps`` as in torch and
    vLLM). LayerNorm is refused even without bias: it centres its input, RMSNorm does not.
    """
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() != 1:
        return False
    if getattr(module, "bias", None) is not None:
        return False
    name = type(module).__name__.lower()
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return False
    if "layernorm" in name and "rms" not in name:
        return False
    return "rmsnorm" in name or hasattr(module, "variance_epsilon") or hasattr(module, "eps")


LAYER_TYPES = {"linear": is_linear, "rmsnorm": is_rmsnorm}

# Children that give a block away when its class name does not (GPT-2 "c_attn", vLLM "qkv_proj").
_ATTENTION_CHILDREN = ({"q_proj", "k_proj"}, {"qkv_proj"}, {"c_attn"}, {"Wqkv"}, {"query_key_value"})
_MLP_CHILDREN = ({"gate_proj", "down_proj"}, {"up_proj", "down_proj"}, {"gate_up_proj", "down_proj"},
                 {"fc1", "fc2"}, {"c_fc", "c_proj"}, {"w1", "w2"}, {"experts"})


_MLP_CLASS = re.compile(r"mlp|feedforward|sparsemoe|moeblock|moelayer|moe$")


def _has_children(module: nn.Module, groups) -> bool:
    names = set(module._modules)
    return any(group <= names for group in groups)


def is_attention(module: nn.Module) -> bool:
    """True for attention blocks: "Attention" in the class name, or q/k (or fused qkv) projections."""
    if is_linear(module):
        return False
    return "attention" in type(module).__name__.lower() or _has_children(module, _ATTENTION_CHILDREN)


def is_mlp(module: nn.Module) -> bool:
    """True for feed-forward blocks, dense or mixture-of-experts (the sparse MoE block as a whole).

    "MLP", "FeedForward", "SparseMoe", "MoeBlock"/"MoeLayer" or a trailing "MoE" in the class name
    (not "Qwen2MoeModel"), or the children of one
    (gate/up/down projections, fc1/fc2, c_fc/c_proj, w1/w2, an ``experts`` container).
    """
    if is_linear(module) or is_experts(module):
        return False
    name = type(module).__name__.lower()
    if _MLP_CLASS.search(name):
        return True
    return _has_children(module, _MLP_CHILDREN)


def is_experts(module: nn.Module) -> bool:
    """True for fused MoE expert containers: "Experts" in the class name and stacked 3-D expert
    weights (transformers 5 ``MixtralExperts``, ``Qwen2MoeExperts``), which no "linear" spec reaches.
    Operator-level noise covers their GEMMs (they call ``F.linear`` per expert)."""
    if "experts" not in type(module).__name__.lower():
        return False
    return any(p is not None and p.dim() == 3 for p in module._parameters.values())


# Blocks are matched outermost first: a block inside a selected block of the same type is left out
# (Qwen2-MoE's shared_expert MLP lies inside its sparse MoE block), so output noise lands once.
BLOCK_TYPES = {"attention": is_attention, "mlp": is_mlp, "experts": is_experts}
_ALL_TYPES = {**LAYER_TYPES, **BLOCK_TYPES}


def decoder_layer_index(name: str) -> int | None:
    """The decoder-layer index in a qualified name (``model.layers.14.mlp`` -> 14), else None."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def decoder_layer_indices(model: nn.Module) -> list[int]:
    """Sorted decoder-layer indices present in the model's module names."""
    indices = {decoder_layer_index(name) for name, _ in model.named_modules()}
    indices.discard(None)
    return sorted(indices)


def format_layer_range(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``, for error messages; ``"none"`` when empty."""
    indices = sorted(set(indices))
    if not indices:
        return "none"
    runs, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(runs)


def parse_layers(layers) -> tuple[int, ...]:
    """Decoder-layer indices from an iterable of ints or a string such as ``"14-17"`` or ``"0-3,14"``."""
    if isinstance(layers, str):
        out: list[int] = []
        for part in layers.replace(" ", "").split(","):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not match:
                raise ValueError(
                    f"bad layer spec {layers!r}; expected indices and ranges such as '14-17' or '0-3,14'"
                )
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"bad layer range {part!r} in {layers!r}: the end is below the start")
            out.extend(range(lo, hi + 1))
        return tuple(out)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    try:
        items = list(layers)
    except TypeError:
        raise ValueError(
            f"bad layers {layers!r}; expected an iterable of layer indices or a string like '14-17'"
        ) from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"bad layer index {item!r} in {layers!r}; expected non-negative integers")
    return tuple(items)


def matches_name(name: str, pattern: str, *, inside: bool = False) -> bool:
    """True if the glob matches the whole name or a dotted suffix of it (``"mlp.*_proj"``).

    With ``inside=True`` it also matches anything inside a matching module, which is what an
    exclude means: excluding ``"lora_A"`` excludes ``...q_proj.lora_A.default``.
    """
    forms = [pattern, f"*.{pattern}"]
    if inside:
        forms += [f"{pattern}.*", f"*.{pattern}.*"]
    return any(fnmatch.fnmatchcase(name, form) for form in forms)


def _as_tuple(spec, what: str) -> tuple[str, ...]:
    if isinstance(spec, str):
        return (spec,)
    try:
        items = tuple(spec)
    except TypeError:
        raise ValueError(f"bad {what} {spec!r}; expected a string or a sequence of strings") from None
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"bad {what} entry {item!r}; expected a layer type or a name glob (a string)")
    return items


_NAME_SEPARATORS = ("+", ",")  # separate parts and names in spec strings: never inside one name
_RANGE_CONTINUATION = re.compile(r"^\d+(?:-\d+)?$")


def parse_names(spec, what: str = "targets") -> tuple[str, ...]:
    """A targets / exclude selection from its spec form, the one parser of it.

    ``spec``: a string of comma-separated names (``"linear,*.q_proj"``, as after ``targets:`` in an
    emulation spec) or a sequence of names. A layer range keeps its own commas: ``"layers.0-3,14"``
    is ``("layers.0-3", "layers.14")`` (the same modules). Each name is a non-empty string without
    '+' or ','; a ValueError names the bad entry.
    """
    if isinstance(spec, str):
        items: list = []
        for item in spec.split(","):
            stripped = item.strip()
            if items and _RANGE_CONTINUATION.match(stripped) and _LAYER_RANGE_SPEC.match(str(items[-1]).strip()):
                items.append(f"layers.{stripped}")
            else:
                items.append(item)
    else:
        try:
            items = list(spec)
        except TypeError:
            raise ValueError(f"bad {what} {spec!r}; expected a string or a sequence of strings") from None
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"bad {what} entry {item!r} in {spec!r}; expected a non-empty string "
                             "(a layer type such as 'linear', 'layers.14-17' or a name glob)")
        if any(sep in item for sep in _NAME_SEPARATORS):
            raise ValueError(f"bad {what} entry {item!r}: '+' and ',' separate parts and names in emulation "
                             f"specs; give several {what} as a sequence")
        out.append(item.strip())
    return tuple(out)


def _no_match(what: str, model: nn.Module) -> ValueError:
    names = [name for name, _ in model.named_modules() if name]
    step = max(1, len(names) // _NAMES_SHOWN)
    shown = ", ".join(names[::step][:_NAMES_SHOWN])
    where = (f"some module names in this model: {shown}" if names
             else f"this {type(model).__name__} has no submodules (only a layer type can select it)")
    return ValueError(f"{what} matched no module; layer types: {', '.join(_ALL_TYPES)}; {where}")


def _names_default_exclude(spec: str, name: str) -> bool:
    """True if the name glob ``spec`` spells out a default-excluded name that ``name`` falls under."""
    return any(d in spec and matches_name(name, d, inside=True) for d in DEFAULT_EXCLUDE)


_LAYER_RANGE_SPEC = re.compile(r"^layers\.(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


def select_modules(
    model: nn.Module,
    targets,
    layers=None,
    exclude=None,
    *,
    default_exclude: bool = True,
) -> dict[str, nn.Module]:
    """Select modules by type and name, keyed by qualified name in model order.

    targets: "linear", "rmsnorm", "attention", "mlp" (dense or MoE block), "experts" (fused MoE
    expert weights), "layers.14-17" (a decoder-layer range: restricts the other specs, or selects
    the linear layers there when it stands alone), a glob on qualified names (``"*.q_proj"``, ``"mlp.down_proj"``;
    a glob may match the whole name or a dotted suffix), or a sequence of those (union).
    The root module is a candidate like any other: ``select_modules(nn.Linear(4, 4), "linear")``
    gives ``{"": the linear}`` (its qualified name is ``""``, as in ``named_modules()``); name globs
    never match the root, which has no name.
    layers: decoder-layer indices (ints or ``"14-17"``); modules outside decoder layers (the
    final norm) are then left out. exclude: globs removed from the selection, together with
    everything inside them; ``DEFAULT_EXCLUDE`` (lm_head, embed_tokens, LoRA A/B) is added unless
    ``default_exclude=False``, except for modules a name-glob target names explicitly
    (``targets=["linear", "lm_head"]`` includes lm_head; ``"linear"`` alone or ``"*"`` does not).
    A target that matches nothing, or an empty result, is a ValueError.
    """
    target_specs = _as_tuple(targets, "targets")
    if not target_specs:
        raise ValueError(f"targets is empty; give a layer type ({', '.join(_ALL_TYPES)}) or a name glob")
    # "layers.14-17" restricts to decoder layers (of the other specs' types; linear if none given).
    range_specs = [m.group(1) for m in map(_LAYER_RANGE_SPEC.match, target_specs) if m]
    if range_specs:
        target_specs = tuple(t for t in target_specs if not _LAYER_RANGE_SPEC.match(t)) or ("linear",)
        from_specs = [i for r in range_specs for i in parse_layers(r)]
        layers = from_specs if layers is None else sorted(set(parse_layers(layers)) & set(from_specs))
    user_excludes = _as_tuple(exclude, "exclude") if exclude is not None else ()
    excludes = DEFAULT_EXCLUDE + user_excludes if default_exclude else user_excludes

    wanted_layers = None
    if layers is not None:
        wanted_layers = set(parse_layers(layers))
        present = decoder_layer_indices(model)
        missing = sorted(wanted_layers - set(present))
        if missing:
            raise ValueError(
                f"layers {missing} are not decoder layer indices of this model; "
                f"valid: {format_layer_range(present)}"
            )

    modules = list(model.named_modules())
    selected: dict[str, nn.Module] = {}
    named = set()  # selected by a glob that spells out a default-excluded name: kept despite it
    for spec in target_specs:
        if spec in LAYER_TYPES:
            hits = [(n, m) for n, m in modules if LAYER_TYPES[spec](m)]
        elif spec in BLOCK_TYPES:
            hits = []
            for n, m in modules:  # the root ("") contains every other module
                if BLOCK_TYPES[spec](m) and not any(h == "" or n.startswith(h + ".") for h, _ in hits):
                    hits.append((n, m))
        else:
            hits = [(n, m) for n, m in modules if n and matches_name(n, spec)]
            named.update(n for n, _ in hits if _names_default_exclude(spec, n))
        if not hits:
            raise _no_match(f"target {spec!r}", model)
        for name, module in hits:
            selected.setdefault(name, module)

    result = {}
    for name, module in modules:  # model order, whatever the order of the specs
        if name not in selected:
            continue
        if any(matches_name(name, p, inside=True) for p in (user_excludes if name in named else excludes)):
            continue
        if wanted_layers is not None and decoder_layer_index(name) not in wanted_layers:
            continue
        result[name] = module
    if not result:
        raise _no_match(
            f"targets {list(target_specs)} with layers={layers!r} and exclude={list(excludes)}", model
        )
    return result
