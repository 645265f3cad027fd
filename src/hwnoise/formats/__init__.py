"""Number formats: element grids, scale modes, MX / NVFP4 / HiF4 block quantizers, the registry.

Inside the package every import points down: elements, blocks -> kernels, hif4 -> registry ->
compiled -> fake_quant -> encoding -> survey (which also uses hwnoise.metrics).
"""

from ..compat import warn_renamed
from .elements import ELEMENTS, ROUNDING_MODES, ElementFormat, element
from .encoding import Encoded, decode, encode
from .kernels import SCALE_MODES
from .fake_quant import quantize
from .registry import FormatSpec, get, names

__all__ = [
    "ELEMENTS", "ROUNDING_MODES", "SCALE_MODES", "ElementFormat", "Encoded", "FormatSpec",
    "decode", "element", "encode", "get", "names", "quantize",
]


# The FormatSpec methods of 0.1, kept for one release. They live here, above registry, fake_quant
# and encoding, so that the registry (at the bottom) imports none of the modules that use it.
def _spec_quantize(self, x, **options):
    warn_renamed("FormatSpec.quantize(x)", "hwnoise.formats.quantize(x, format)")
    return quantize(x, self, **options)


def _spec_encode(self, x, **options):
    warn_renamed("FormatSpec.encode(x)", "hwnoise.formats.encode(x, format)")
    return encode(x, self, **options)


def _spec_decode(self, encoded):
    warn_renamed("FormatSpec.decode(encoded)", "hwnoise.formats.decode(encoded)")
    return decode(encoded)


FormatSpec.quantize, FormatSpec.encode, FormatSpec.decode = _spec_quantize, _spec_encode, _spec_decode
