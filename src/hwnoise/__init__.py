"""hwnoise: emulate number formats and hardware noise, find the layers they hurt, train them robust."""

from . import formats, metrics
from .formats import quantize
from .aqn import AQN

__version__ = "0.1.0"
__all__ = ["formats", "metrics", "quantize", "__version__", "AQN"]
