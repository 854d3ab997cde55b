"""XConv: convolution layers that keep a random sketch of their input instead of the input.

Thatipelli, Sam, Louboutin, Siahkoohi, Wang, Herrmann, "XConv: Low-memory stochastic
backpropagation for convolutional layers" (arXiv 2106.06998, TMLR 2026).
"""
from . import memory
from .convert import convert, revert, set_probes
from .nn import (
    BitLeakyReLU,
    BitReLU,
    XConv1d,
    XConv2d,
    XConv3d,
    XConvTranspose1d,
    XConvTranspose2d,
    XConvTranspose3d,
)

__all__ = [
    "BitLeakyReLU", "BitReLU", "XConv1d", "XConv2d", "XConv3d", "XConvTranspose1d",
    "XConvTranspose2d", "XConvTranspose3d", "convert", "memory", "revert", "set_probes",
]
__version__ = "0.1.0"
