"""The format registry: a table of frozen specs, and spec strings.

Adding a format is adding a row to `_ROWS`. A spec string is a registered name, optionally with
options after a colon: "mxfp4:rceil", "mxfp4:block=32x32,rounding=stochastic", "nvfp4:torchao".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .blocks import normalize_block
from .elements import ELEMENTS, ROUNDING_MODES, ElementFormat
from .hif4 import BITS_PER_VALUE as HIF4_BITS_PER_VALUE
from .kernels import SCALE_MODES

FAMILIES = ("mx", "nvfp4", "hif4", "per_tensor", "cast")
FLAVORS = {"mx": ("ocp", "torchao"), "nvfp4": ("nvidia", "torchao")}
HIF4_GROUP = 64


@dataclass(frozen=True)
class FormatSpec:
    """A number format: its element format, block shape and scale format, plus default options."""

    name: str
    family: str
    element: ElementFormat
    block: tuple[int, ...] | None  # None: no blocks (per-tensor scale or a plain cast)
    scale_format: str  # "e8m0", "e4m3 + fp32 tensor", "fp32 tensor", "hif4 3-level", "none"
    scale_mode: str | None = None
    rounding: str = "rne"
    flavor: str | None = None
    alias_of: str | None = None
    description: str = field(default="", compare=False)

    @property
    def bits_per_value(self) -> float:
        """Storage per element, scales included (the fp32 tensor scale is amortized to ~0)."""
        if self.family == "mx":
            return self.element.bits + 8 / _block_numel(self.block)
        if self.family == "nvfp4":
            return self.element.bits + 8 / _block_numel(self.block)
        if self.family == "hif4":
            return HIF4_BITS_PER_VALUE
        return float(self.element.bits)

    def with_options(self, **options) -> "FormatSpec":
        """A copy with validated default options (scale_mode, rounding, block, flavor); ``self`` when
        none is given."""
        changed = resolve_options(self, **options)
        return replace(self, **changed) if changed else self

    # quantize / encode / decode are functions of the modules above this one
    # (hwnoise.formats.quantize(x, format), encode(x, format), decode(encoded)): the registry imports none of them.


def resolve_options(fmt: FormatSpec, scale_mode=None, rounding=None, block=None, flavor=None) -> dict:
    """Validate options against the format; return the ones that differ from its defaults."""
    out = {}
    if scale_mode is not None:
        if fmt.family != "mx":
            raise ValueError(f"{fmt.name} has no scale_mode (only MX formats take one); got {scale_mode!r}")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"unknown scale_mode {scale_mode!r}; known: {', '.join(SCALE_MODES)}")
        out["scale_mode"] = scale_mode
    if rounding is not None:
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDING_MODES)}")
        out["rounding"] = rounding
    if block is not None:
        if fmt.block is None:
            raise ValueError(f"{fmt.name} has no blocks ({fmt.scale_format} scaling); do not pass block={block!r}")
        block = normalize_block(block)
        if fmt.family == "hif4" and block != (64,):
            raise ValueError(f"hif4 groups are 64 elements by definition; got block={block!r}")
        out["block"] = block
    if flavor is not None:
        known = FLAVORS.get(fmt.family, ())
        if flavor not in known:
            raise ValueError(f"unknown flavor {flavor!r} for {fmt.name}; known: {', '.join(known) or '(none)'}")
        out["flavor"] = flavor
    return out


def _block_numel(block) -> int:
    n = 1
    for b in block:
        n *= b
    return n


E = ELEMENTS
_ROWS = (
    FormatSpec("mxfp4", "mx", E["e2m1"], (32,), "e8m0", "floor", flavor="ocp",
               description="OCP MX FP4 (E2M1), 32-element blocks, E8M0 scale"),
    FormatSpec("mxfp6_e2m3", "mx", E["e2m3"], (32,), "e8m0", "floor", flavor="ocp",
               description="OCP MX FP6 (E2M3)"),
    FormatSpec("mxfp6_e3m2", "mx", E["e3m2"], (32,), "e8m0", "floor", flavor="ocp",
               description="OCP MX FP6 (E3M2)"),
    FormatSpec("mxfp8_e4m3", "mx", E["e4m3"], (32,), "e8m0", "floor", flavor="ocp",
               description="OCP MX FP8 (E4M3)"),
    FormatSpec("mxfp8_e5m2", "mx", E["e5m2"], (32,), "e8m0", "floor", flavor="ocp",
               description="OCP MX FP8 (E5M2)"),
    FormatSpec("mxint8", "mx", E["int8"], (32,), "e8m0", "floor", flavor="ocp",
               description="OCP MX INT8 (k/64, symmetric)"),
    FormatSpec("nvfp4", "nvfp4", E["e2m1"], (16,), "e4m3 + fp32 tensor", flavor="nvidia",
               description="NVIDIA NVFP4: E2M1, 16-element blocks, E4M3 block scale, fp32 tensor scale"),
    FormatSpec("hif4", "hif4", E["s1p2"], (HIF4_GROUP,), "e6m2 + 8x1 + 16x1 bits", rounding="half_away",
               description="Huawei HiFloat4: 64-element groups, three scale levels"),
    FormatSpec("fp8_e4m3", "per_tensor", E["e4m3"], None, "fp32 tensor",
               description="FP8 E4M3 with one fp32 scale per tensor"),
    FormatSpec("fp8_e5m2", "per_tensor", E["e5m2"], None, "fp32 tensor",
               description="FP8 E5M2 with one fp32 scale per tensor"),
    FormatSpec("bf16", "cast", E["bf16"], None, "none", description="bfloat16 cast"),
    FormatSpec("fp16", "cast", E["fp16"], None, "none", description="IEEE half cast"),
)
_FORMATS: dict[str, FormatSpec] = {row.name: row for row in _ROWS}
_ALIASES = {
    "mxfp8": replace(_FORMATS["mxfp8_e4m3"], name="mxfp8", alias_of="mxfp8_e4m3"),
    "mxfp6": replace(_FORMATS["mxfp6_e2m3"], name="mxfp6", alias_of="mxfp6_e2m3"),
    "mxfp4_2d": replace(_FORMATS["mxfp4"], name="mxfp4_2d", block=(32, 32), alias_of="mxfp4",
                        description="MXFP4 with 32x32 tiles (one scale per tile)"),
    "mxfp4_sr": replace(_FORMATS["mxfp4"], name="mxfp4_sr", rounding="stochastic", alias_of="mxfp4",
                        description="MXFP4 with stochastic rounding"),
}
_FORMATS.update(_ALIASES)


def names(include_aliases: bool = True) -> list[str]:
    """Every registered format name (aliases last unless excluded)."""
    base = [r.name for r in _ROWS]
    return base + (list(_ALIASES) if include_aliases else [])


def get(spec) -> FormatSpec:
    """Look up a format by name or spec string ("mxfp4", "mxfp4:rceil", "nvfp4:flavor=torchao")."""
    if isinstance(spec, FormatSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"format must be a name or a FormatSpec, got {type(spec).__name__}")
    name, _, opts = spec.strip().partition(":")
    key = name.strip().lower()
    if key not in _FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(names())}")
    fmt = _FORMATS[key]
    if opts:
        fmt = fmt.with_options(**parse_options(opts, fmt))
    return fmt


def parse_options(text: str, fmt: FormatSpec) -> dict:
    """Parse "rceil,block=32x32,rounding=stochastic" into options; bare words are a scale mode,
    a rounding mode or a flavor, whichever they name."""
    out: dict = {}
    given: dict = {}  # option -> the part of `text` that set it, to name both sides of a conflict

    def put(key, value, part):
        if key in out and out[key] != value:
            raise ValueError(f"conflicting {key} in {fmt.name + ':' + text!r}: {given[key]!r} and {part!r}; give one {key}")
        out[key], given[key] = value, part

    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if key == "block":
                try:
                    dims = [int(v) for v in value.lower().split("x")]
                except ValueError:
                    raise ValueError(f"bad block {value!r} in {text!r}; accepted: an int such as 32 or a tile "
                                     f"such as 32x32") from None
                put("block", dims[0] if len(dims) == 1 else tuple(dims), part)
            elif key in ("scale_mode", "rounding", "flavor"):
                put(key, value, part)
            else:
                raise ValueError(f"unknown format option {key!r} in {text!r}; known: scale_mode, rounding, block, flavor")
        elif part in SCALE_MODES:
            put("scale_mode", part, part)
        elif part in ROUNDING_MODES:
            put("rounding", part, part)
        elif part in FLAVORS.get(fmt.family, ()):
            put("flavor", part, part)
        else:
            raise ValueError(
                f"unknown format option {part!r} for {fmt.name}; accepted: scale modes {', '.join(SCALE_MODES)}, "
                f"roundings {', '.join(ROUNDING_MODES)}, flavors {', '.join(FLAVORS.get(fmt.family, ())) or '(none)'}"
            )
    return out
