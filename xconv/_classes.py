"""Which torch layer :func:`xconv.convert` turns into which xconv layer (and back), under which options."""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .batchnorm import BATCHNORM_CLASSES
from ._layer import _XConvMixin
from .nn import XCONV_CLASSES, BitLeakyReLU, BitReLU
from .options import ConvertOptions
from .pooling import MAXPOOL_CLASSES

TORCH_CLASSES = {xcls: tcls for tcls, xcls in XCONV_CLASSES.items()}
ACTIVATIONS = {nn.ReLU: BitReLU, nn.LeakyReLU: BitLeakyReLU}
# Layers converted by their exact class (subclasses may compute something else), and back.
TORCH_CLASSES.update({new: old for old, new in {**ACTIVATIONS, **MAXPOOL_CLASSES, **BATCHNORM_CLASSES}.items()})
X_BATCHNORMS = tuple(BATCHNORM_CLASSES.values())


def torch_conv_class(module: nn.Module) -> type | None:
    """The torch conv class ``module`` can be converted from, or None.

    A subclass that overrides ``forward`` or ``_conv_forward`` computes something else than
    the torch layer (e.g. weight standardisation, "same" padding by hand), so it is not
    converted; nor is a parametrized conv (``torch.nn.utils.parametrizations.spectral_norm``,
    ``weight_norm``), whose class torch generates to compute the weight.
    """
    if parametrize.is_parametrized(module):  # spectral_norm / weight_norm: its weight is a computed property
        return None
    for tcls in XCONV_CLASSES:
        if isinstance(module, tcls) and not isinstance(module, _XConvMixin):
            cls = type(module)
            overrides = any(getattr(cls, f, None) is not getattr(tcls, f, None) for f in ("forward", "_conv_forward"))
            return None if overrides else tcls
    return None


def conversion_status(module: nn.Module) -> str:
    """How :func:`convert` treats ``module`` itself (not its children).

    Returns:
        ``"converted"``: an xconv layer (XConv, 1-bit (leaky) ReLU, SR BatchNorm, offset
        max-pool); ``"convertible"``: a torch layer that :func:`convert` replaces with some
        options (conv, ReLU/LeakyReLU, BatchNorm, MaxPool), left as it is here by the options
        or ``include``/``exclude``; ``"unconvertible"``: anything else (other layers, conv
        subclasses that override ``forward``, containers).
    """
    if type(module) in TORCH_CLASSES:
        return "converted"
    convertible = (*ACTIVATIONS, *BATCHNORM_CLASSES, *MAXPOOL_CLASSES)
    return "convertible" if torch_conv_class(module) is not None or type(module) in convertible else "unconvertible"


def target_class(module: nn.Module, options: ConvertOptions, named: set[str]) -> type | None:
    """The class :func:`convert` gives ``module`` under ``options``, or None to leave it alone; a layer
    converted before keeps what ``named`` (the options this call sets) does not cover."""
    if isinstance(module, _XConvMixin):
        return type(module)
    if (tcls := torch_conv_class(module)) is not None:
        return XCONV_CLASSES[tcls]
    converted = type(module) in TORCH_CLASSES
    torch_class = TORCH_CLASSES.get(type(module), type(module))
    if torch_class in ACTIVATIONS:
        if converted and "relu" not in named:
            return type(module)
        return ACTIVATIONS[torch_class] if options.relu == "bit" else torch_class
    if torch_class in BATCHNORM_CLASSES:
        if converted and "batchnorm_bits" not in named:
            return type(module)
        return torch_class if options.batchnorm_bits is None else BATCHNORM_CLASSES[torch_class]
    if torch_class in MAXPOOL_CLASSES:
        if converted and "maxpool" not in named:
            return type(module)
        return MAXPOOL_CLASSES[torch_class] if options.maxpool else torch_class
    return None
