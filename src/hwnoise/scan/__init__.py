"""Layer sensitivity: per-module quantization scan, fault scans, recommendation, AQN multiplier export.

``scan(model, tokenizer, format="mxfp4", where="weight")`` returns a ``ScanReport`` (JSON first;
tables, HTML and plots are views, in ``views``); ``scan_faults`` compares gain, kurtosis and
instability per decoder layer under two weight formats (``format_a``, ``format_b``).
"""

from .core import FORMAT_OPTIONS, SCAN_EXCLUDE, WHERE, ResolvedFormat, aggregate_layers, resolve_format, scan
from .faults import FaultLayer, FaultReport, scan_faults
from .report import DEFAULT_TIERS, LAYER_METRICS, LayerRow, ModuleRow, Recommendation, ScanReport, Thresholds
from .texts import BUILTIN_TEXTS, DEFAULT_SAMPLES, calibration_texts, read_texts

__all__ = [
    "BUILTIN_TEXTS", "DEFAULT_SAMPLES", "DEFAULT_TIERS", "FORMAT_OPTIONS", "FaultLayer", "FaultReport",
    "LAYER_METRICS", "LayerRow", "SCAN_EXCLUDE", "ModuleRow", "Recommendation", "ResolvedFormat", "ScanReport",
    "Thresholds", "WHERE", "aggregate_layers", "calibration_texts", "read_texts", "resolve_format", "scan",
    "scan_faults",
]
