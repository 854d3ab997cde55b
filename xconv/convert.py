"""Convert a model's convolutions and (leaky) ReLUs to XConv layers in place, and back.

A module object used at several places (``nn.Sequential(c, nn.ReLU(), c)``, or one block held
by two parents) is converted once and every place that refers to it gets the same new layer,
so it stays shared. It is converted only when every name it is reached by is selected by
``include``/``exclude``: a use the patterns keep exact is never made approximate through another
name of the same object.
"""
from __future__ import annotations

import fnmatch
import logging
import warnings
from collections import OrderedDict

from torch import nn
from torch.nn.utils import parametrize

from .batchnorm import BATCHNORM_CLASSES
from ._layer import _XConvMixin
from ._options import validate_sketch_config
from .nn import XCONV_CLASSES, BitLeakyReLU, BitReLU
from .pooling import MAXPOOL_CLASSES
from .quantize import check_bits

log = logging.getLogger(__name__)

_TORCH_CLASSES = {xcls: tcls for tcls, xcls in XCONV_CLASSES.items()}
_ACTIVATIONS = {nn.ReLU: BitReLU, nn.LeakyReLU: BitLeakyReLU}
# Layers converted by their exact class (subclasses may compute something else), and back.
_TORCH_CLASSES.update({new: old for old, new in {**_ACTIVATIONS, **MAXPOOL_CLASSES, **BATCHNORM_CLASSES}.items()})
_X_BATCHNORMS = tuple(BATCHNORM_CLASSES.values())


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
    if type(module) in _TORCH_CLASSES:
        return "converted"
    convertible = (*_ACTIVATIONS, *BATCHNORM_CLASSES, *MAXPOOL_CLASSES)
    return "convertible" if _torch_conv_class(module) is not None or type(module) in convertible else "unconvertible"


def _selected(name: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _aliases(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every distinct module of ``model`` with all the names it is reached by, in model order.

    ``named_modules()`` lists a shared module under its first name only; its other uses would
    stay unconverted (and no longer shared) if only that name were replaced.
    """
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        found.setdefault(id(module), (module, []))[1].append(name)
    return list(found.values())


def _swap(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Point every child slot of ``model`` holding a replaced module (keyed by ``id``) at its
    replacement; returns the new root (``model`` unless the root itself is replaced)."""
    # The replacements' own child dicts are copies of the old ones and are fixed too, so a
    # replaced module's replaced children (and their other parents) agree.
    for parent in [*model.modules(), *replacements.values()]:
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, key, replacements[id(child)])
    return replacements.get(id(model), model)


def _target(module: nn.Module, relu: bool, batchnorm_bits: int | None, maxpool: bool) -> type | None:
    """The class :func:`convert` gives ``module`` under these options, or None to leave it alone."""
    if isinstance(module, _XConvMixin):
        return type(module)
    if (tcls := _torch_conv_class(module)) is not None:
        return XCONV_CLASSES[tcls]
    if relu and type(module) in _ACTIVATIONS:
        return _ACTIVATIONS[type(module)]
    torch_class = _TORCH_CLASSES.get(type(module), type(module))
    if torch_class in BATCHNORM_CLASSES:
        return torch_class if batchnorm_bits is None else BATCHNORM_CLASSES[torch_class]
    if torch_class in MAXPOOL_CLASSES:
        return MAXPOOL_CLASSES[torch_class] if maxpool else torch_class
    return None


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
    are unchanged. Subclasses of convs that override ``forward`` and parametrized convs
    (``spectral_norm``, ``weight_norm``) are skipped with a warning.
    Layers converted before are kept and take the new options. A module object used at several
    places is replaced at all of them by one new layer, so it stays shared.

    Only modules are converted: activations called as functions in a ``forward``
    (``F.relu(x)``, as in torchvision's GoogLeNet and Inception) keep their full input or
    output for backward. ``xconv.memory.saved_tensor_bytes(..., model=model).summary()`` shows
    how many of the saved bytes such code holds.

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
            the convs to convert, a list or one pattern as a string; activations, BatchNorms
            and max-pools follow the same selection. A module reached by several names is
            touched only if all of them are selected (a warning names the shared modules left
            as they are because only some are).
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
    modules = _aliases(model)
    convertible = tuple(XCONV_CLASSES) + (tuple(_ACTIVATIONS) if relu else ())
    convs = [names[0] for module, names in modules if isinstance(module, tuple(XCONV_CLASSES))]
    shown = ", ".join(convs[:8]) + (", ..." if len(convs) > 8 else "")
    if include and not any(isinstance(module, convertible) and any(_selected(n, include, exclude) for n in names)
                           for module, names in modules):
        raise ValueError(f"include: no conv{' or ReLU' if relu else ''} matches {include}; "
                         f"the model's convs: {shown or 'none'}")
    names = [name for _, aliases in modules for name in aliases]
    unmatched = [p for p in exclude or () if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:  # a typo would otherwise convert the layers it was meant to keep exact
        raise ValueError(f"exclude: no module matches {unmatched}; the model's convs: {shown or 'none'}")
    converted, skipped, partly_selected, replacements = [], [], [], {}
    for module, aliases in modules:
        chosen = [_selected(name, include, exclude) for name in aliases]
        target = _target(module, relu, batchnorm_bits, maxpool)
        if target is None:
            if isinstance(module, tuple(XCONV_CLASSES)) and any(chosen):
                skipped.append(f"{aliases[0]} ({type(module).__name__})")
            continue
        # Re-initialised in place (new options) or replaced: anything but a layer that stays as it is.
        acts = target is not type(module) or issubclass(target, (_XConvMixin, *_X_BATCHNORMS))
        if not all(chosen):
            if acts and any(chosen):
                partly_selected.append(" / ".join(aliases))
            continue
        if target is type(module):
            new = module
        elif target in _TORCH_CLASSES.values():  # back to torch's layer: drop the xconv attributes
            new = _plain(module)
        else:
            new = _rebuild(module, target)
        if type(new) in _TORCH_CLASSES:  # an xconv layer: its errors and warnings name it
            new.xconv_name = aliases[0]
        if isinstance(new, _XConvMixin):
            new._init_xconv(min_pixels, **options)
            converted.append(aliases[0])
        elif isinstance(new, _X_BATCHNORMS):
            new._init_bits(batchnorm_bits)
        if new is not module:
            replacements[id(module)] = new
    model = _swap(model, replacements)
    if skipped:
        warnings.warn("xconv.convert skipped conv subclasses that override forward and parametrized convs "
                      f"(spectral_norm, weight_norm): {', '.join(skipped)}")
    if partly_selected:
        warnings.warn("xconv.convert left shared modules as they are because include/exclude select only some "
                      f"of their names: {', '.join(partly_selected)}")
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
    layers, in place; a shared layer is replaced by one torch layer at all its places.

    Returns:
        ``model`` (or the new layer when ``model`` itself is an xconv layer).
    """
    return _swap(model, {id(m): _plain(m) for m in model.modules() if type(m) in _TORCH_CLASSES})


def _plain(module: nn.Module) -> nn.Module:
    """The torch layer a converted ``module`` came from, sharing its parameters and buffers."""
    new = _rebuild(module, _TORCH_CLASSES[type(module)])
    for attr in ("sketch_config", "min_pixels", "bits", "xconv_name"):
        new.__dict__.pop(attr, None)
    return new
