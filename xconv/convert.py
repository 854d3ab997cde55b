"""Convert a model's convolutions and (leaky) ReLUs to XConv layers in place, and back."""
from __future__ import annotations

import fnmatch
import logging
import warnings
from collections import OrderedDict

from torch import nn

from .batchnorm import BATCHNORM_CLASSES
from .functional import validate_sketch_config
from .nn import XCONV_CLASSES, BitLeakyReLU, BitReLU, _XConvMixin
from .pooling import MAXPOOL_CLASSES
from .quantize import check_bits

log = logging.getLogger(__name__)

_TORCH_CLASSES = {xcls: tcls for tcls, xcls in XCONV_CLASSES.items()}
_ACTIVATIONS = {nn.ReLU: BitReLU, nn.LeakyReLU: BitLeakyReLU}
# Layers converted by their exact class (subclasses may compute something else), and back.
_TORCH_CLASSES.update({new: old for old, new in {**_ACTIVATIONS, **MAXPOOL_CLASSES, **BATCHNORM_CLASSES}.items()})


def _rebuild(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters, buffers, hooks and mode."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        setattr(new, key, OrderedDict(getattr(module, key)))
    return new


def _torch_conv_class(module: nn.Module) -> type | None:
    """The torch conv class ``module`` can be converted from, or None.

    A subclass that overrides ``forward`` or ``_conv_forward`` computes something else than
    the torch layer (e.g. weight standardisation, "same" padding by hand), so it is not
    converted.
    """
    for tcls in XCONV_CLASSES:
        if isinstance(module, tcls) and not isinstance(module, _XConvMixin):
            cls = type(module)
            overrides = any(getattr(cls, f, None) is not getattr(tcls, f, None) for f in ("forward", "_conv_forward"))
            return None if overrides else tcls
    return None


def _selected(name: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def convert(
    model: nn.Module,
    probes: int = 8,
    mode: str = "independent",
    distribution: str = "gaussian",
    relu: bool = True,
    min_pixels: int | None = None,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
    per_sample: bool = False,
    deflation: str | None = None,
    deflation_rank: int | None = None,
    storage: str = "sketch",
    bits: int | None = None,
    max_compression: int | None = None,
    batchnorm_bits: int | None = None,
    maxpool: bool = False,
) -> nn.Module:
    """Replace every torch conv (and ReLU/LeakyReLU when ``relu``) by its XConv layer, in place.

    The new layers reuse the same ``Parameter`` objects, buffers and hooks, so
    ``state_dict`` keys and values, device, dtype, train/eval mode and existing optimizers
    are unchanged. Subclasses of convs that override ``forward`` are skipped with a warning.
    Layers converted before are kept and take the new options.

    Args:
        model: any ``nn.Module``; the model itself may be a conv.
        probes, mode, distribution, per_sample, deflation, deflation_rank, storage, bits,
            max_compression: see :class:`xconv.XConv2d`.
        relu: also swap ``nn.ReLU`` / ``nn.LeakyReLU`` for ``BitReLU`` / ``BitLeakyReLU``.
        batchnorm_bits: also swap ``nn.BatchNorm1d/2d/3d`` for :class:`xconv.batchnorm.XBatchNorm2d`
            and its siblings, which keep their input in SR storage at these bits (2, 4, 8, 16);
            ``None`` keeps torch's BatchNorm (converted ones go back).
        maxpool: also swap ``nn.MaxPool1d/2d/3d`` for :class:`xconv.pooling.XMaxPool2d` and its
            siblings, which keep the argmax's offset in its window (2-8 bits) instead of the
            input and int64 indices; ``False`` keeps (or restores) torch's.
        min_pixels: see :class:`xconv.XConv2d`; ``None`` skips where the sketch would not be
            smaller than the input.
        include, exclude: ``fnmatch`` patterns on module names (``"encoder.*"``) selecting
            the convs to convert, a list or one pattern as a string; activations follow the
            same selection.
    Returns:
        ``model`` (or the new layer when ``model`` itself is a conv).
    Raises:
        TypeError, ValueError: invalid estimator options, ``include`` patterns that select
            nothing to convert (a typo would otherwise leave the model exact), or an ``exclude``
            pattern that matches no module, before anything is replaced.
    """
    options = dict(
        probes=probes, mode=mode, distribution=distribution, per_sample=per_sample,
        deflation=deflation, deflation_rank=deflation_rank, storage=storage, bits=bits,
        max_compression=max_compression,
    )
    validate_sketch_config(**options)
    check_bits("batchnorm_bits", batchnorm_bits)
    if not isinstance(maxpool, bool):
        raise TypeError(f"maxpool must be a bool, got {maxpool!r}")
    include, exclude = ([p] if isinstance(p, str) else p for p in (include, exclude))
    selected = [(name, module) for name, module in model.named_modules() if _selected(name, include, exclude)]
    convertible = tuple(XCONV_CLASSES) + (tuple(_ACTIVATIONS) if relu else ())
    convs = [name for name, module in model.named_modules() if isinstance(module, tuple(XCONV_CLASSES))]
    shown = ", ".join(convs[:8]) + (", ..." if len(convs) > 8 else "")
    if include and not any(isinstance(module, convertible) for _, module in selected):
        raise ValueError(f"include: no conv{' or ReLU' if relu else ''} matches {include}; "
                         f"the model's convs: {shown or 'none'}")
    names = [name for name, _ in model.named_modules()]
    unmatched = [p for p in exclude or () if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:  # a typo would otherwise convert the layers it was meant to keep exact
        raise ValueError(f"exclude: no module matches {unmatched}; the model's convs: {shown or 'none'}")
    converted, skipped = [], []
    for name, module in selected:
        tcls = _torch_conv_class(module)
        if isinstance(module, _XConvMixin):  # converted before: take the new options
            module._init_xconv(min_pixels, **options)
            converted.append(name)
        elif tcls is not None:
            new = _rebuild(module, XCONV_CLASSES[tcls])
            new._init_xconv(min_pixels, **options)
            model = _replace(model, name, new)
            converted.append(name)
        elif isinstance(module, tuple(XCONV_CLASSES)) and not isinstance(module, _XConvMixin):
            skipped.append(f"{name} ({type(module).__name__})")
        elif relu and type(module) in _ACTIVATIONS:
            model = _replace(model, name, _rebuild(module, _ACTIVATIONS[type(module)]))
        elif (torch_class := _TORCH_CLASSES.get(type(module), type(module))) in BATCHNORM_CLASSES:
            if batchnorm_bits is None:
                model = _replace(model, name, _plain(module)) if torch_class is not type(module) else model
            else:
                new = _rebuild(module, BATCHNORM_CLASSES[torch_class])
                new._init_bits(batchnorm_bits)
                model = _replace(model, name, new)
        elif torch_class in MAXPOOL_CLASSES:
            target = MAXPOOL_CLASSES[torch_class] if maxpool else torch_class
            model = _replace(model, name, _rebuild(module, target)) if target is not type(module) else model
    if skipped:
        warnings.warn(f"xconv.convert skipped conv subclasses that override forward: {', '.join(skipped)}")
    how = f"bits={bits} quantized" if storage == "quantized" else f"probes={probes}, mode={mode}"
    log.info("xconv.convert: %d convs converted (%s)", len(converted), how)
    return model


def set_probes(model: nn.Module, probes: int) -> nn.Module:
    """Set the probe count of every XConv layer in ``model`` (0 = exact gradients).

    Raises:
        TypeError, ValueError: ``probes`` is not an int >= 0, or is not above a layer's
            ``deflation_rank`` (that layer and the ones after it keep their count).
    """
    validate_sketch_config(probes, "independent", "gaussian")
    for module in model.modules():
        if isinstance(module, _XConvMixin):
            module.probes = probes
    return model


def revert(model: nn.Module) -> nn.Module:
    """Replace XConv layers, 1-bit activations, SR BatchNorms and offset max-pools by plain torch
    layers, in place."""
    for name, module in list(model.named_modules()):
        if type(module) in _TORCH_CLASSES:
            model = _replace(model, name, _plain(module))
    return model


def _plain(module: nn.Module) -> nn.Module:
    """The torch layer a converted ``module`` came from, sharing its parameters and buffers."""
    new = _rebuild(module, _TORCH_CLASSES[type(module)])
    for attr in ("sketch_config", "min_pixels", "bits"):
        new.__dict__.pop(attr, None)
    return new
