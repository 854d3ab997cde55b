"""XConv: convolution layers that keep a random sketch of their input instead of the input.

Thatipelli, Sam, Louboutin, Siahkoohi, Wang, Herrmann, "XConv: Low-memory stochastic
backpropagation for convolutional layers" (arXiv 2106.06998, TMLR 2026).
"""
from . import functional, memory, options, quantize
from ._options import SketchConfig
from .batchnorm import XBatchNorm1d, XBatchNorm2d, XBatchNorm3d
from .checkpointing import checkpoint_modules, checkpointed_module_names, remove_checkpointing
from .convert import convert, revert, set_probes
from .options import ConvertOptions
from .planner import plan_storage
from .storage_plan import StoragePlan
from .pooling import XMaxPool1d, XMaxPool2d, XMaxPool3d
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
    "BitLeakyReLU", "BitReLU", "ConvertOptions", "SketchConfig", "StoragePlan", "XBatchNorm1d", "XBatchNorm2d", "XBatchNorm3d", "XConv1d",
    "XConv2d", "XConv3d", "XConvTranspose1d", "XConvTranspose2d", "XConvTranspose3d", "XMaxPool1d",
    "XMaxPool2d", "XMaxPool3d", "checkpoint_modules", "checkpointed_module_names", "convert", "functional", "memory",
    "options", "plan_storage", "quantize", "remove_checkpointing", "revert", "set_probes",
]
__version__ = "0.1.0"
