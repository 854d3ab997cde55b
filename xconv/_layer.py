"""What every XConv layer adds to its torch parent: the estimator options, when to use them, and the seed.

The math is in :mod:`xconv.functional`; a layer decides whether its call estimates (``min_pixels``),
draws the call's seed and names itself in errors.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from . import rng
from ._autograd import layer_label
from ._options import SKETCH_FIELDS, SketchConfig, check_min_pixels, layer_probes, sketch_numel_per_sample
from .rng import draw_seed

# xconv.rng.backward_count() at the last repeated-seed warning.
_REPEAT_WARNED_AT: list[int | None] = [None]


class _XConvMixin:
    """Estimator options, the decision to estimate, and each call's seed, shared by all XConv layers."""

    def _init_xconv(self, min_pixels: int | None = None, **options) -> None:
        """Validate and set the estimator ``options`` (the fields of :class:`SketchConfig`)."""
        sketch_config = SketchConfig(**options)
        check_min_pixels(min_pixels)
        self.sketch_config, self.min_pixels = sketch_config, min_pixels

    @property
    def probes(self) -> int:
        return self.sketch_config.probes

    @probes.setter
    def probes(self, value: int) -> None:
        self.sketch_config = dataclasses.replace(self.sketch_config, probes=value)

    def uses_estimator(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` keeps a sketch instead of running the plain layer.

        Needs a batched input, grad mode, a weight that requires grad and ``probes > 0`` (any ``probes`` with
        ``storage="quantized"``). Then the layer input must have at least ``min_pixels``
        pixels, or, when ``min_pixels`` is None, the sketch must be smaller than the input
        (``H*W > r`` in independent mode; always, with quantized storage).
        """
        cfg = self.sketch_config
        quantized = cfg.storage == "quantized"
        if x.dim() != self.weight.dim():  # an unbatched input [C, *S]: torch's layer takes it as it is
            return False
        if (cfg.probes == 0 and not quantized) or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return False
        pixels = math.prod(x.shape[2:])
        if self.min_pixels is not None:
            return pixels >= self.min_pixels
        if quantized:
            return True
        cfg = dataclasses.replace(cfg, probes=layer_probes(cfg, x.shape))
        return sketch_numel_per_sample(cfg, x.shape[1]) < x.shape[1] * pixels

    def _seed_and_label(self) -> tuple[torch.Tensor, str]:
        """A new seed for this call (:func:`xconv.rng.draw_seed`) and how errors name the layer; warns
        when the seed keeps repeating."""
        # last_seed: the seed of the last estimator forward, for the repeated-seed warning below.
        previous, seed = self.__dict__.get("last_seed"), draw_seed()
        self.last_seed = seed
        cfg = self.sketch_config
        how = f"bits={cfg.bits} quantized" if cfg.storage == "quantized" else f"mode={cfg.mode!r}"
        if cfg.storage == "sketch" and cfg.deflation is not None:
            how += f", deflation={cfg.deflation!r}"
        layer = layer_label(self, f"weight {list(self.weight.shape)}, {how}")
        # A third draw of one seed in a row means the RNG state keeps being set back. Forwards run
        # inside a backward are recomputations (activation checkpointing), which draw their
        # forward's seed again on purpose (torch's checkpoint tells them apart the same way).
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() == -1:
            repeated = previous is not None and int(previous) == int(seed)
            repeats = self.__dict__.get("_seed_repeats", 0) + 1 if repeated else 0
            self._seed_repeats = repeats
            # One warning per forward: its other layers repeat alike.
            if repeats == 2 and rng.backward_count() != _REPEAT_WARNED_AT[0]:
                _REPEAT_WARNED_AT[0] = rng.backward_count()
                warnings.warn(f"{layer} drew the same seed in three forwards in a row: torch's RNG state is set back "
                              "before each (torch.manual_seed with one seed before every step?), so they repeat one "
                              "estimate and its error does not average out (layers after it likely too)",
                              RuntimeWarning, stacklevel=2)
        return seed, layer

    def extra_repr(self) -> str:
        cfg = self.sketch_config
        if cfg.storage == "quantized":
            extra = f", storage='quantized', bits={cfg.bits}"
        else:
            extra = f", probes={cfg.probes}, mode={cfg.mode!r}, distribution={cfg.distribution!r}"
            if cfg.bits is not None:
                extra += f", bits={cfg.bits}"
            if cfg.max_compression is not None:
                extra += f", max_compression={cfg.max_compression}"
            if cfg.per_sample:
                extra += ", per_sample=True"
            if cfg.deflation is not None:
                extra += f", deflation={cfg.deflation!r}, deflation_rank={cfg.rank}"
        if self.min_pixels is not None:
            extra += f", min_pixels={self.min_pixels}"
        return super().extra_repr() + extra


class _XConvLayer(_XConvMixin):
    """The constructor shared by the XConv classes: the torch layer's arguments, then the estimator
    options, as one :class:`SketchConfig` (``sketch=``) or by name (``probes=8, mode="multi"``; ``probes``
    is 8 where not given), not both."""

    def __init__(self, *args, sketch: SketchConfig | None = None, min_pixels: int | None = None, **kwargs):
        options = {name: kwargs.pop(name) for name in SKETCH_FIELDS if name in kwargs}
        super().__init__(*args, **kwargs)
        if sketch is not None and not isinstance(sketch, SketchConfig):
            raise TypeError(f"sketch must be a SketchConfig or None, got {sketch!r}")
        if sketch is not None and options:
            raise TypeError(f"give the estimator options as sketch=SketchConfig(...) or by name, not both: got sketch= "
                            f"and {', '.join(options)}")
        self._init_xconv(min_pixels, **(dataclasses.asdict(sketch) if sketch is not None else {"probes": 8, **options}))
