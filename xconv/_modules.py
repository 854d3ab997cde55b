"""Module-tree surgery for :mod:`xconv.convert`: a layer of another class that shares a module's
parameters, and the swap of modules at every place a model holds them."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def rebuild(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters, buffers, hooks and mode."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        setattr(new, key, OrderedDict(getattr(module, key)))
    return new


def all_names(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every distinct module of ``model`` with all the names it is reached by, in model order.

    ``named_modules()`` lists a shared module under its first name only; its other uses would
    stay unconverted (and no longer shared) if only that name were replaced.
    """
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        found.setdefault(id(module), (module, []))[1].append(name)
    return list(found.values())


def swap(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Point every child slot of ``model`` holding a replaced module (keyed by ``id``) at its
    replacement; returns the new root (``model`` unless the root itself is replaced)."""
    # The replacements' own child dicts are copies of the old ones and are fixed too, so a
    # replaced module's replaced children (and their other parents) agree.
    for parent in [*model.modules(), *replacements.values()]:
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, key, replacements[id(child)])
    return replacements.get(id(model), model)
