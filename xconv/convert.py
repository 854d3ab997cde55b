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

from ._classes import ACTIVATIONS, TORCH_CLASSES, X_BATCHNORMS, target_class
from ._layer import _XConvMixin
from ._modules import all_names, rebuild, swap
from ._options import SKETCH_FIELDS, SketchConfig, validate_sketch_config
from .nn import XCONV_CLASSES
from .options import ConvertOptions, merged_options

log = logging.getLogger(__name__)


def _selected(name: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, p) for p in exclude)


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
    :func:`xconv.plan_storage`). With an ``options`` object, all of its values apply. Every module
    a call reaches keeps that record (and whether ``include``/``exclude`` selected it), so a model
    and its submodules may be converted apart, in any order. ``include``/``exclude`` select the
    layers a call touches; layers converted earlier outside them stay converted (:func:`revert`
    undoes a conversion and drops the records).

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
    every, given = {f.name for f in dataclasses.fields(ConvertOptions)}, options is not None
    # The options this call sets on conv layers converted before (the others keep theirs).
    named = every if given else set(overrides)
    options = merged_options(options if given else getattr(model, "xconv_options", None), overrides)
    relu, include, exclude = options.relu == "bit", options.include, options.exclude
    new_selection = given or "include" in named or "exclude" in named
    modules = all_names(model)
    convertible = tuple(XCONV_CLASSES) + (tuple(ACTIVATIONS) if relu else ())
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
    converted, skipped, partly_selected, replacements, settings, batchnorms, records = [], [], [], {}, [], [], []
    for module, aliases in modules:
        # What the last convert that reached this module set (through this model or through another
        # that holds it) stays, but for what this call names.
        own = module.__dict__.get("xconv_options")
        layer_options = options if given or own is None else merged_options(own, overrides)
        named_for_kinds = every if given or own is not None else named
        if new_selection or own is None:
            chosen = [_selected(name, include, exclude) for name in aliases]
        else:
            chosen = [module.__dict__.get("xconv_selected", True)] * len(aliases)
        records.append((module, layer_options, all(chosen)))
        target = target_class(module, layer_options, named_for_kinds)
        if target is None:
            if isinstance(module, tuple(XCONV_CLASSES)) and any(chosen):
                skipped.append(f"{aliases[0]} ({type(module).__name__})")
            continue
        # Re-initialised in place (new options) or replaced: anything but a layer that stays as it is.
        acts = target is not type(module) or issubclass(target, (_XConvMixin, *X_BATCHNORMS))
        if not all(chosen):
            if acts and any(chosen):
                partly_selected.append(" / ".join(aliases))
            continue
        if target is type(module):
            new = module
        elif target in TORCH_CLASSES.values():  # back to torch's layer: drop the xconv attributes
            new = _plain(module)
        else:
            new = rebuild(module, target)
        if type(new) in TORCH_CLASSES:  # an xconv layer: its errors and warnings name it
            new.xconv_name = aliases[0]
        if isinstance(new, _XConvMixin):
            settings.append((new, *_layer_settings(module, layer_options, named)))
            converted.append(aliases[0])
        elif isinstance(new, X_BATCHNORMS) and (new is not module or "batchnorm_bits" in named_for_kinds):
            batchnorms.append((new, layer_options.batchnorm_bits))
        if new is not module:
            replacements[id(module)] = new
    # Everything is checked by now: a refused call leaves the model as it was.
    for layer, sketch_config, min_pixels in settings:
        layer.sketch_config, layer.min_pixels = sketch_config, min_pixels
    for layer, bits in batchnorms:
        layer._init_bits(bits)
    for module, layer_options, selected in records:  # include/exclude name modules from this call's root only
        if module is not model:
            layer_options = dataclasses.replace(layer_options, include=None, exclude=None)
        _record(replacements.get(id(module), module), layer_options, selected)
    model = swap(model, replacements)
    if skipped:
        warnings.warn("xconv.convert skipped conv subclasses that override forward and parametrized convs "
                      f"(spectral_norm, weight_norm): {', '.join(skipped)}")
    if partly_selected:
        warnings.warn("xconv.convert left shared modules as they are because include/exclude select only some "
                      f"of their names: {', '.join(partly_selected)}")
    how = f"bits={options.bits} quantized" if options.storage == "quantized" else f"probes={options.probes}, mode={options.mode}"
    log.info("xconv.convert: %d convs converted (%s)", len(converted), how)
    return model


def _record(module: nn.Module, options: ConvertOptions, selected: bool) -> None:
    module.xconv_options = options
    if selected:
        module.__dict__.pop("xconv_selected", None)
    else:  # left as it was by include/exclude: a later call that names neither leaves it so
        module.xconv_selected = False


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
    model = swap(model, {id(m): _plain(m) for m in model.modules() if type(m) in TORCH_CLASSES})
    for module in model.modules():
        for attr in ("xconv_options", "xconv_selected"):
            module.__dict__.pop(attr, None)
    return model


def _plain(module: nn.Module) -> nn.Module:
    """The torch layer a converted ``module`` came from, sharing its parameters and buffers."""
    new = rebuild(module, TORCH_CLASSES[type(module)])
    for attr in ("sketch_config", "min_pixels", "bits", "xconv_name"):
        new.__dict__.pop(attr, None)
    return new
