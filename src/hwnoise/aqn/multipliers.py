"""Per-layer AQN strength: a multiplier per decoder-layer index and an optional targeted set.

The layer scan exports the JSON form::

    {"layer_multipliers": {"14": 1.5}, "default_multiplier": 1.0, "targeted": [14, 15]}

Indices are checked against a model with ``check_model``: a multiplier for a layer the model
does not have is a mistake (a scan of a different model), not something to ignore.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..select import format_layer_range

__all__ = ["JSON_KEYS", "LayerMultipliers"]

JSON_KEYS = ("layer_multipliers", "default_multiplier", "targeted")


def _layer_key(key, where: str) -> int:
    # JSON object keys are strings; "14" and 14 both mean layer 14.
    if isinstance(key, bool):
        raise ValueError(f"{where}: layer key {key!r} is not a decoder layer index (a non-negative integer)")
    if isinstance(key, int):
        index = key
    elif isinstance(key, str) and key.strip().isdigit():
        index = int(key)
    else:
        raise ValueError(f"{where}: layer key {key!r} is not a decoder layer index (a non-negative integer)")
    if index < 0:
        raise ValueError(f"{where}: layer key {key!r} is negative; decoder layer indices start at 0")
    return index


def _factor(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: multiplier {value!r} must be a finite number >= 0")
    return float(value)


@dataclass(frozen=True)
class LayerMultipliers:
    """Noise multipliers per decoder-layer index, a default for the rest, and an optional target set.

    ``targeted`` None: every selected layer gets noise; otherwise only those decoder layers do
    (modules outside decoder layers, such as the final norm, get none either).
    """

    layer_multipliers: Mapping[int, float] = field(default_factory=dict)
    default_multiplier: float = 1.0
    targeted: frozenset[int] | None = None
    source: str = field(default="multipliers", compare=False)

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "multipliers") -> "LayerMultipliers":
        """From ``{layer: factor}`` or from the scan's JSON shape (a mapping with "layer_multipliers")."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object / dict; got {type(data).__name__}")
        if "layer_multipliers" not in data:
            return cls(cls._layers(data, source), source=source)
        unknown = sorted(set(map(str, data)) - set(JSON_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; accepted: {', '.join(JSON_KEYS)}")
        layers = data["layer_multipliers"]
        if not isinstance(layers, Mapping):
            raise ValueError(f"{source}: 'layer_multipliers' must be an object {{layer: factor}}; got {layers!r}")
        default = _factor(data.get("default_multiplier", 1.0), f"{source}: 'default_multiplier'")
        targeted = data.get("targeted")
        if targeted is not None:
            if isinstance(targeted, (str, bytes, Mapping)) or not hasattr(targeted, "__iter__"):
                raise ValueError(f"{source}: 'targeted' must be a list of layer indices or null; got {targeted!r}")
            targeted = frozenset(_layer_key(k, f"{source}: 'targeted'") for k in targeted)
        return cls(cls._layers(layers, source), default, targeted, source=source)

    @staticmethod
    def _layers(data: Mapping, source: str) -> dict[int, float]:
        out = {}
        for key, value in data.items():
            index = _layer_key(key, source)
            if index in out:
                raise ValueError(f"{source}: layer {index} is given twice")
            out[index] = _factor(value, f"{source}: layer {key!r}")
        return out

    @classmethod
    def from_json(cls, path) -> "LayerMultipliers":
        """Read the scan's JSON export; a missing file or malformed JSON is a ValueError naming the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read AQN multipliers file {str(path)!r}: {err.strerror or err}") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"AQN multipliers file {str(path)!r} is not valid JSON (line {err.lineno}, column "
                f"{err.colno}: {err.msg}); expected {{\"layer_multipliers\": {{\"14\": 1.5}}, "
                f"\"default_multiplier\": 1.0, \"targeted\": [14, 15]}}"
            ) from err
        if not isinstance(data, dict) or "layer_multipliers" not in data:
            raise ValueError(
                f"AQN multipliers file {str(path)!r} must be a JSON object with a 'layer_multipliers' "
                f"key; got {type(data).__name__} with keys {sorted(data) if isinstance(data, dict) else []}"
            )
        return cls.from_mapping(data, source=f"AQN multipliers file {str(path)!r}")

    @classmethod
    def coerce(cls, value) -> "LayerMultipliers":
        """None, a dict, a path (str or PathLike) or a LayerMultipliers -> LayerMultipliers."""
        if value is None:
            return cls()
        if isinstance(value, LayerMultipliers):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.from_json(value)
        if isinstance(value, Mapping):
            return cls.from_mapping(value)
        raise ValueError(
            f"multipliers must be a dict {{layer: factor}}, a path to the scan's JSON, or None; "
            f"got {type(value).__name__}"
        )

    def multiplier(self, layer: int | None) -> float:
        """The factor for a decoder layer (None: a module outside decoder layers); 0 if untargeted."""
        if self.targeted is not None and layer not in self.targeted:
            return 0.0
        if layer is None:
            return self.default_multiplier
        return self.layer_multipliers.get(layer, self.default_multiplier)

    def is_targeted(self, layer: int | None) -> bool:
        """Whether a module in this decoder layer (None: outside decoder layers) may get noise."""
        return self.targeted is None or layer in self.targeted

    def check_model(self, present_layers) -> None:
        """Raise if a multiplier key or a targeted layer is not a decoder-layer index of the model."""
        present = set(present_layers)
        named = set(self.layer_multipliers) | set(self.targeted or ())
        missing = sorted(named - present)
        if missing:
            raise ValueError(
                f"{self.source}: layer(s) {missing} are not decoder layer indices of this model; "
                f"valid: {format_layer_range(present)}"
            )
