"""Activation checkpointing of named submodules: the exact-gradient baseline that trades time for memory.

``checkpoint_modules(model, ["encoder.layer*"])`` makes each matching submodule (a *segment*)
run under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: in forward a
segment keeps only its inputs for backward, and backward runs its forward once more to get
the rest. Gradients are exact (bit for bit those of the unwrapped model: the RNG state and
XConv's seed count are replayed, so dropout masks and XConv probe seeds repeat) and BatchNorm running statistics
are updated once per forward, as without checkpointing.
"""
from __future__ import annotations

import contextlib
import fnmatch
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

from . import rng


@contextlib.contextmanager
def _running_stats_kept(segment: nn.Module):
    """Put back the running statistics of the norm layers in ``segment`` after the block runs.

    Backward's recomputation runs each BatchNorm's train-mode forward a second time, which
    would update ``running_mean``, ``running_var`` and ``num_batches_tracked`` twice per step.
    The snapshot is taken when the recomputation starts, so updates made by other forwards of
    the segment before this backward (a GAN's discriminator on real, then fake) are kept.
    """
    # _NormBase: torch's BatchNorm*d and SyncBatchNorm, xconv's XBatchNorm*d, InstanceNorm with running stats.
    buffers = [b for m in segment.modules() if isinstance(m, _NormBase) and m.track_running_stats
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:  # also when checkpoint stops the recomputation early (it raises to do so)
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


@contextlib.contextmanager
def _count_recorded(record: dict):
    record["count"] = rng.draw_count()
    yield


class _Recomputation:
    """The context of a segment's recomputation. torch enters it once per recomputation (a second
    backward through a kept graph recomputes again), so each entry builds its contexts anew."""

    def __init__(self, segment: nn.Module, record: dict):
        self.segment, self.record = segment, record

    def __enter__(self) -> None:
        # torch replays the generator state; XConv layers also need the count of seeds already
        # derived from it (xconv.rng.draw_seed) to derive the forward's seeds again.
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(rng.replayed_draw_count(self.record["count"]))
        self.stack.enter_context(_running_stats_kept(self.segment))

    def __exit__(self, *exc_info) -> bool:
        return self.stack.__exit__(*exc_info)


def _contexts(segment: nn.Module):
    record = {}
    return _count_recorded(record), _Recomputation(segment, record)


class _Checkpointed:
    """Mixed into a module's own class by :func:`checkpoint_modules`; ``_checkpoint_base`` is that class."""

    _checkpoint_base: type

    def forward(self, *args, **kwargs):
        forward = super().forward
        if not torch.is_grad_enabled():  # nothing is saved: recomputing would cost time for nothing
            return forward(*args, **kwargs)
        return _checkpoint(self, forward, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle and deepcopy name the module's own class
        # and the class is made again on loading (torch.save of a whole model works).
        return _new_checkpointed, (self._checkpoint_base,), self.__getstate__()


# Under torch.compile a segment runs eagerly: compiled checkpoints take only dispatch modes as
# context_fn, so a compiled segment would be checkpointed without the one that keeps BatchNorm
# statistics from being updated twice.
@torch.compiler.disable
def _checkpoint(segment: nn.Module, forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=partial(_contexts, segment), **kwargs)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Checkpointed{base.__name__}", (_Checkpointed, base),
                              {"_checkpoint_base": base})
    return _CLASSES[base]


def _new_checkpointed(base: type) -> nn.Module:
    return object.__new__(_checkpointed_class(base))


def checkpoint_modules(model: nn.Module, include: list[str] | str) -> nn.Module:
    """Checkpoint every submodule whose qualified name matches one of the ``include`` patterns, in place.

    Each selected module keeps its object, parameters, buffers, hooks and ``state_dict`` keys;
    only its class becomes a subclass (``Sequential`` -> ``CheckpointedSequential``) whose
    ``forward`` runs the original one under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False, preserve_rng_state=True)``, in grad
    mode only (under ``torch.no_grad()`` or ``torch.inference_mode()`` it is the plain forward).

    What is kept: per segment, its inputs; nothing computed inside it (XConv sketches and
    1-bit masks included) stays alive between forward and backward. What it costs: one extra
    forward of each segment in backward, with the RNG state it had in forward, so gradients
    are exact and identical to the unwrapped model's. The norm layers' running statistics are
    restored after that recomputation (updated once per forward, as without checkpointing).

    Where a pattern matches a module and some of its descendants, only the outermost is
    checkpointed (a segment inside a checkpointed segment would save nothing more). A module
    reached by several names is one object and is checkpointed at all of them. Apply it after
    :func:`xconv.convert`, which converts layers by their exact class, and undo it with
    :func:`remove_checkpointing` before :func:`xconv.revert`.

    Args:
        model: any ``nn.Module``.
        include: ``fnmatch`` patterns on ``model.named_modules()`` names (``"encoder.layer*"``,
            ``"decoder.blocks.*"``), a list or one pattern as a string.
    Returns:
        ``model`` (the same object; its class changes if it matches itself, e.g. ``"*"``).
    Raises:
        TypeError: ``include`` is not a string or a list of strings.
        ValueError: a pattern that matches no module, before anything is changed.

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 1))
        >>> checkpoint_modules(net, "0")[0].__class__.__name__
        'CheckpointedSequential'
        >>> net(torch.randn(2, 4)).sum().backward()
    """
    patterns = [include] if isinstance(include, str) else include
    if not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"include must be a module-name pattern or a non-empty list of them, got {include!r}")
    names = dict(model.named_modules(remove_duplicate=False))
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        shown = sorted(filter(None, names), key=_depth)[:8]  # the outermost names say most about the model
        raise ValueError(f"include: no module matches {unmatched}; the model's modules: "
                         f"{', '.join(shown) or 'none'}{', ...' if len(names) > 9 else ''}")
    selected = sorted((name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)), key=_depth)
    for name in selected:  # outermost first
        parents = [".".join(name.split(".")[:i]) for i in range(_depth(name))]  # "" (the model), "a", "a.b" for "a.b.c"
        if any(isinstance(names[parent], _Checkpointed) for parent in parents):
            continue  # already inside a segment
        module = names[name]
        for inner in module.modules():  # a segment checkpointed before, now inside this one, is one no more
            if isinstance(inner, _Checkpointed):
                inner.__class__ = inner._checkpoint_base
        module.__class__ = _checkpointed_class(type(module))
    return model


def _depth(name: str) -> int:
    """0 for the model itself (``""``), 1 for its children, ..."""
    return name.count(".") + bool(name)


def checkpointed_module_names(model: nn.Module) -> list[str]:
    """Names of the checkpointed modules of ``model`` (each module once), in model order."""
    return [name for name, module in model.named_modules() if isinstance(module, _Checkpointed)]


def remove_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`checkpoint_modules` in place: every checkpointed module gets its own class back."""
    for module in model.modules():
        if isinstance(module, _Checkpointed):
            module.__class__ = module._checkpoint_base
    return model
