"""Number formats: element grids, scale modes, MX / NVFP4 / HiF4 block quantizers, the registry.

Inside the package every import points down: elements, blocks -> kernels, hif4 -> registry ->
compiled -> fake_quant -> encoding -> survey (which also uses hwnoise.metrics).
"""

from .elements import ELEMENTS, ROUNDING_MODES, ElementFormat, element
from .encoding import Encoded, decode, encode
from .kernels import SCALE_MODES
from .fake_quant import quantize
from .registry import FormatSpec, get, names

__all__ = [
    "ELEMENTS", "ROUNDING_MODES", "SCALE_MODES", "ElementFormat", "Encoded", "FormatSpec",
    "decode", "element", "encode", "get", "names", "quantize",
]

