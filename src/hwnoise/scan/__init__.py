"""Layer sensitivity: per-module quantization scan, fault scans, recommendation, AQN multiplier export.

``scan(model, tokenizer, format="mxfp4", mode="weight")`` returns a ``ScanReport`` (JSON first;
tables, HTML and plots are views); ``scan_faults`` compares gain, kurtosis and instability per
decoder layer under two weight configurations.
"""

from .core import FORMAT_OPTIONS, MODES, SCAN_EXCLUDE, aggregate_layers, scan
from .faults import FaultLayer, FaultReport, scan_faults
from .report import DEFAULT_TIERS, LayerRow, ModuleRow, Recommendation, ScanReport, Thresholds
from .texts import BUILTIN_TEXTS, DEFAULT_SAMPLES, calibration_texts, read_texts

__all__ = [
    "BUILTIN_TEXTS", "DEFAULT_SAMPLES", "DEFAULT_TIERS", "FORMAT_OPTIONS", "FaultLayer", "FaultReport",
    "LayerRow", "MODES", "SCAN_EXCLUDE", "ModuleRow", "Recommendation", "ScanReport", "Thresholds", "aggregate_layers",
    "calibration_texts", "read_texts", "scan", "scan_faults",
]
