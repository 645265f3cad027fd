"""A mixed-precision weight plan: a number format per module, usable wherever a weight format is.

``hwnoise scan --plan`` writes one as ``plan.json``: a JSON object mapping each module's qualified
name to a format spec (``{"model.layers.0.mlp.down_proj": "mxfp8_e4m3", ...}``). Modules the plan
does not name are left as they are. The same file is accepted by ``hwnoise eval --setting
weights:plan.json``, by ``TrainConfig``'s ``emulation.weight_format`` and, in Python, by
``hn.errors.Quantize(plan)`` with ``hn.inject(..., where="weight")``.

This module knows formats only (not scans): it reads, checks and applies the mapping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WeightPlan", "check_weight_format", "is_plan_spec", "looks_like_path", "resolve_weights", "REFERENCE_BITS"]

# Effective bits per weight of a full-precision (unquantized) weight in plan accounting: bf16.
REFERENCE_BITS = 16.0


def is_plan_spec(value) -> bool:
    """Whether a weight-format value names a plan (a WeightPlan, a mapping, or a ``.json`` path)."""
    if isinstance(value, (WeightPlan, Mapping)):
        return True
    return isinstance(value, (str, os.PathLike)) and str(value).strip().lower().endswith(".json")


@dataclass(frozen=True)
class WeightPlan:
    """Module name -> format spec, in a fixed order; ``source`` is the file it was read from."""

    formats: tuple[tuple[str, str], ...]
    source: str | None = None

    def __post_init__(self):
        from .formats import get as get_format

        if not self.formats:
            raise ValueError("a weight plan needs at least one module -> format entry")
        specs = {}
        for name, spec in self.formats:
            if not isinstance(name, str) or not name:
                raise ValueError(f"weight plan: module names must be non-empty strings; got {name!r}")
            if not isinstance(spec, str):
                raise ValueError(f"weight plan: {name}: format must be a spec string such as 'mxfp4'; got {spec!r}")
            try:
                specs[name] = get_format(spec)
            except ValueError as err:
                raise ValueError(f"weight plan{f' {self.source}' if self.source else ''}: {name}: {err}") from None
        object.__setattr__(self, "_specs", specs)  # resolved once: every module's FormatSpec

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Mapping, source: str | None = None) -> "WeightPlan":
        where = f"weight plan {source!r}: " if source else ""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"{where}a weight plan is a JSON object module name -> format spec; "
                             f"got a JSON {type(mapping).__name__}")
        if "schema_version" in mapping and "modules" in mapping:  # a scan.json, not the plan.json beside it
            raise ValueError(f"{where}this is a scan report (scan.json), not a weight plan; `hwnoise scan --plan` "
                             f"writes the plan as plan.json beside it: give that file")
        return cls(tuple((str(k), v.strip() if isinstance(v, str) else v) for k, v in mapping.items()), source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WeightPlan":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"weight plan {str(path)!r} not found (write one with `hwnoise scan --plan`)") from None
        except IsADirectoryError:
            raise ValueError(f"weight plan {str(path)!r} is a directory; give the plan file in it, e.g. "
                             f"{str(path / 'plan.json')!r} (written by `hwnoise scan --plan`)") from None
        except UnicodeDecodeError:
            raise ValueError(f"weight plan {str(path)!r} is not a text file (not UTF-8); a plan is the JSON "
                             f"object module -> format that `hwnoise scan --plan` writes as plan.json") from None
        except OSError as err:
            raise ValueError(f"weight plan {str(path)!r} cannot be read: {err.strerror or err}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"weight plan {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def coerce(cls, value) -> "WeightPlan":
        """A WeightPlan from itself, a mapping, or a path to a plan.json."""
        if isinstance(value, WeightPlan):
            return value
        if isinstance(value, Mapping):
            return cls.from_mapping(value)
        if isinstance(value, (str, os.PathLike)):
            return cls.load(str(value).strip())
        raise ValueError(f"a weight plan is a plan.json path, a dict or a WeightPlan; got {type(value).__name__}")

    # -- queries --------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, str]:
        return dict(self.formats)

    def format_for(self, name: str) -> str | None:
        """The format spec string the plan gives module ``name`` (None: not in the plan)."""
        return self.as_dict().get(name)

    def spec_for(self, name: str):
        """The resolved ``FormatSpec`` of module ``name`` (None: not in the plan); no registry look-up."""
        return self._specs.get(name)

    def select(self, model, exclude=None) -> dict:
        """The model's modules the plan names (qualified name -> module), in model order. A name
        the model lacks is an error (a plan for another model); ``exclude`` globs are honoured."""
        from fnmatch import fnmatchcase

        wanted = self.as_dict()
        found = {name: m for name, m in model.named_modules() if name in wanted}
        missing = [n for n in wanted if n not in found]
        if missing:
            raise ValueError(f"weight plan{f' {self.source}' if self.source else ''} names {len(missing)} module(s) "
                             f"this model does not have: {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
        excludes = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())
        return {n: m for n, m in found.items()
                if not any(fnmatchcase(n, e) or fnmatchcase(n, f"*{e}*") for e in excludes)}

    def effective_bits(self, model) -> float:
        """Bits per weight over the plan's modules: each format's bits_per_value (scale overhead
        included) weighted by the module's weight count."""
        from .formats import get as get_format

        total = bits = 0.0
        for name, module in self.select(model).items():
            n = module.weight.numel()
            total += n
            bits += n * get_format(self.format_for(name)).bits_per_value
        return bits / total if total else float("nan")

    def __str__(self) -> str:
        return self.source or f"<plan of {len(self.formats)} modules>"


def looks_like_path(value) -> bool:
    """Whether a format value is a file path rather than a format spec (a path separator, or a file
    suffix such as ``.txt``, or an existing file): formats are names like ``mxfp4:rceil``."""
    if isinstance(value, os.PathLike):
        return True
    if not isinstance(value, str):
        return False
    text = value.strip()
    suffix = Path(text).suffix
    return "/" in text or os.sep in text or (len(suffix) > 1 and suffix[1:].isalpha()) or Path(text).is_file()


def resolve_weights(value):
    """A weights value resolved once: a ``WeightPlan`` (a plan.json path, a mapping, a WeightPlan) or a
    ``FormatSpec``. A file that is not a ``.json`` plan gets a message saying what a plan is.

    Args:
        value: ``"mxfp4"``, ``"mxfp4:rceil"``, ``"plan.json"``, a dict module -> format, a WeightPlan.

    Example:
        >>> resolve_weights("mxfp4").name
        'mxfp4'
    """
    from .formats import get as get_format

    if is_plan_spec(value):
        return WeightPlan.coerce(value)
    if looks_like_path(value):
        raise ValueError(f"weights:{value}: a weight plan is a .json file (module -> format, written by "
                         f"`hwnoise scan --plan` as plan.json); other files are not read. Or give a format such "
                         f"as weights:mxfp4")
    return get_format(value)


def check_weight_format(value) -> None:
    """Raise ValueError unless ``value`` is a known format spec or a readable weight plan."""
    resolve_weights(value)
