"""Convert a model's convolutions and (leaky) ReLUs to XConv layers in place, and back.

A module object used at several places (``nn.Sequential(c, nn.ReLU(), c)``, or one block held
by two parents) is converted once and every place that refers to it gets the same new layer,
so it stays shared. It is converted only when every name it is reached by is selected by
``include``/``exclude``: a use the patterns keep exact is never made approximate through another
name of the same object.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import warnings

from torch import nn
from torch.nn.utils import parametrize

from .batchnorm import BATCHNORM_CLASSES
from ._layer import _XConvMixin
from ._modules import all_names, rebuild, swap
from ._options import SKETCH_FIELDS, SketchConfig, validate_sketch_config
from .nn import XCONV_CLASSES, BitLeakyReLU, BitReLU
from .options import ConvertOptions, merged_options
from .pooling import MAXPOOL_CLASSES

log = logging.getLogger(__name__)

_TORCH_CLASSES = {xcls: tcls for tcls, xcls in XCONV_CLASSES.items()}
_ACTIVATIONS = {nn.ReLU: BitReLU, nn.LeakyReLU: BitLeakyReLU}
# Layers converted by their exact class (subclasses may compute something else), and back.
_TORCH_CLASSES.update({new: old for old, new in {**_ACTIVATIONS, **MAXPOOL_CLASSES, **BATCHNORM_CLASSES}.items()})
_X_BATCHNORMS = tuple(BATCHNORM_CLASSES.values())


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


def _target(module: nn.Module, options: ConvertOptions, named: set[str]) -> type | None:
    """The class :func:`convert` gives ``module`` under ``options``, or None to leave it alone; a layer
    converted before keeps what ``named`` (the options this call sets) does not cover."""
    if isinstance(module, _XConvMixin):
        return type(module)
    if (tcls := _torch_conv_class(module)) is not None:
        return XCONV_CLASSES[tcls]
    converted = type(module) in _TORCH_CLASSES
    torch_class = _TORCH_CLASSES.get(type(module), type(module))
    if torch_class in _ACTIVATIONS:
        if converted and "relu" not in named:
            return type(module)
        return _ACTIVATIONS[torch_class] if options.relu == "bit" else torch_class
    if torch_class in BATCHNORM_CLASSES:
        if converted and "batchnorm_bits" not in named:
            return type(module)
        return torch_class if options.batchnorm_bits is None else BATCHNORM_CLASSES[torch_class]
    if torch_class in MAXPOOL_CLASSES:
        if converted and "maxpool" not in named:
            return type(module)
        return MAXPOOL_CLASSES[torch_class] if options.maxpool else torch_class
    return None


def convert(model: nn.Module, options: ConvertOptions | None = None, **overrides) -> nn.Module:
    """Replace every torch conv (and ReLU/LeakyReLU when ``relu="bit"``) by its XConv layer, in place.

    The new layers reuse the same ``Parameter`` objects, buffers and hooks, so
    ``state_dict`` keys and values, device, dtype, train/eval mode and existing optimizers
    are unchanged. Subclasses of convs that override ``forward`` and parametrized convs
    (``spectral_norm``, ``weight_norm``) are skipped with a warning.
    A module object used at several places is replaced at all of them by one new layer, so it
    stays shared. Converting again starts from the options the model was converted with
    (kept as ``model.xconv_options``) and changes what the call names: ``convert(model, probes=4)``
    changes the probe count and keeps ``relu``, ``include``, ``exclude``, BatchNorm and max-pool
    storage; a conv layer keeps the estimator options the call does not name (set by hand, or by
    :func:`xconv.plan_storage`). With an ``options`` object, all of its values apply. The record is
    kept on the module passed here only: convert a model and its submodules through one root (a
    submodule converted apart starts from its own record, or the defaults). ``include``/``exclude``
    select the layers a call touches; layers converted earlier outside them stay converted
    (:func:`revert` undoes a conversion).

    Only modules are converted: activations called as functions in a ``forward``
    (``F.relu(x)``, as in torchvision's GoogLeNet and Inception) keep their full input or
    output for backward. ``xconv.memory.saved_tensor_bytes(..., model=model).summary()`` shows
    how many of the saved bytes such code holds.

    Args:
        model: any ``nn.Module``; the model itself may be a conv.
        options: a :class:`~xconv.options.ConvertOptions` (``None``: the options ``model`` was converted
            with before, else the defaults).
        **overrides: fields of :class:`~xconv.options.ConvertOptions` replacing those of ``options``
            (``probes=8``, ``storage="quantized", bits=4``, ``relu="exact"``, ``include=["encoder.*"]``, ...);
            activations, BatchNorms and max-pools follow the convs' ``include``/``exclude``
            selection. A module reached by several names is touched only if all of them are
            selected (a warning names the shared modules left as they are because only some are).
    Returns:
        ``model`` (or the new layer when ``model`` itself is a conv).
    Raises:
        TypeError, ValueError: an unknown or invalid option (see :class:`~xconv.options.ConvertOptions`),
            ``include`` patterns that select nothing to convert (a typo would otherwise leave the model
            exact), or an ``exclude`` pattern that matches no module, before anything is replaced.
    """
    every = {f.name for f in dataclasses.fields(ConvertOptions)}
    recorded = getattr(model, "xconv_options", None)  # what an earlier convert of this model set
    # Options this call sets on conv layers converted before, and on other layers converted before.
    named = set(overrides) if options is None else every
    named_for_kinds = every if options is not None or recorded is not None else named
    options = merged_options(options if options is not None else recorded, overrides)
    relu, include, exclude = options.relu == "bit", options.include, options.exclude
    modules = all_names(model)
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
    converted, skipped, partly_selected, replacements, settings, batchnorms = [], [], [], {}, [], []
    for module, aliases in modules:
        chosen = [_selected(name, include, exclude) for name in aliases]
        target = _target(module, options, named_for_kinds)
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
            new = rebuild(module, target)
        if type(new) in _TORCH_CLASSES:  # an xconv layer: its errors and warnings name it
            new.xconv_name = aliases[0]
        if isinstance(new, _XConvMixin):
            settings.append((new, *_layer_settings(module, options, named)))
            converted.append(aliases[0])
        elif isinstance(new, _X_BATCHNORMS) and (new is not module or "batchnorm_bits" in named_for_kinds):
            batchnorms.append(new)
        if new is not module:
            replacements[id(module)] = new
    # Everything is checked by now: a refused call leaves the model as it was.
    for layer, sketch_config, min_pixels in settings:
        layer.sketch_config, layer.min_pixels = sketch_config, min_pixels
    for layer in batchnorms:
        layer._init_bits(options.batchnorm_bits)
    model = swap(model, replacements)
    model.xconv_options = options
    if skipped:
        warnings.warn("xconv.convert skipped conv subclasses that override forward and parametrized convs "
                      f"(spectral_norm, weight_norm): {', '.join(skipped)}")
    if partly_selected:
        warnings.warn("xconv.convert left shared modules as they are because include/exclude select only some "
                      f"of their names: {', '.join(partly_selected)}")
    how = f"bits={options.bits} quantized" if options.storage == "quantized" else f"probes={options.probes}, mode={options.mode}"
    log.info("xconv.convert: %d convs converted (%s)", len(converted), how)
    return model


def _layer_settings(module: nn.Module, options: ConvertOptions, named: set[str]) -> tuple[SketchConfig, int | None]:
    """The SketchConfig and min_pixels a converted conv gets: a layer converted before keeps the options
    this call does not name; raises what SketchConfig raises for a combination that does not hold."""
    if not isinstance(module, _XConvMixin):
        return options.sketch, options.min_pixels
    changed = {name: getattr(options, name) for name in SKETCH_FIELDS if name in named}
    try:
        sketch_config = dataclasses.replace(module.sketch_config, **changed)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (with the options layer {module.xconv_name!r} keeps from an earlier convert)") from err
    return sketch_config, options.min_pixels if "min_pixels" in named else module.min_pixels


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
    model = swap(model, {id(m): _plain(m) for m in model.modules() if type(m) in _TORCH_CLASSES})
    model.__dict__.pop("xconv_options", None)
    return model


def _plain(module: nn.Module) -> nn.Module:
    """The torch layer a converted ``module`` came from, sharing its parameters and buffers."""
    new = rebuild(module, _TORCH_CLASSES[type(module)])
    for attr in ("sketch_config", "min_pixels", "bits", "xconv_name", "xconv_options"):
        new.__dict__.pop(attr, None)
    return new
