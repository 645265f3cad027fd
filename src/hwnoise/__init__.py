"""hwnoise: emulate number formats and hardware noise, find the layers they hurt, train them robust."""

from . import errors, formats, metrics
from .aqn import AQN
from .eval import EvalReport, evaluate
from .formats import quantize
from .emulation import Emulation
from .inject import inject, noisy_ops, phase
from .scan import ScanReport, scan, scan_faults
from . import mismatch  # a callable package: hn.mismatch(model, tok, rollouts), hn.mismatch.attribute(...)

__version__ = "0.1.0"
__all__ = [
    "AQN", "Emulation", "EvalReport", "ScanReport", "errors", "evaluate", "formats", "inject", "metrics", "mismatch",
    "noisy_ops", "phase", "quantize", "scan", "scan_faults", "__version__",
]
