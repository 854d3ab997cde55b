"""XConv layers and 1-bit activations: drop-in subclasses of the torch layers.

Each ``XConv*`` is its ``torch.nn`` parent (same constructor, parameters, ``state_dict`` and
``repr``) plus the estimator options. Only the training forward changes: under
``torch.no_grad()``, with ``probes=0``, with a frozen weight, or where the sketch would not
be smaller than the input, the layer runs the parent's plain forward.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .functional import (
    BitLeakyReLUFunction,
    ConvGeometry,
    SketchConfig,
    XConvFunction,
    layer_label,
    layer_probes,
    sketch_numel_per_sample,
    validate_sketch_config,
)
from .rng import draw_seed
from .quantized_conv import QuantizedConvFunction


def _warn_if_not_finite(x: torch.Tensor, cfg: SketchConfig, layer: str) -> None:
    """Under torch's anomaly detection (``torch.autograd.set_detect_anomaly(True)``, Lightning's
    ``Trainer(detect_anomaly=True)``), warn naming ``layer`` when its input is not finite: that is
    where a NaN in the weight gradients starts, and in the multi-channel modes it spreads further
    than in torch's layer. Costs one pass over the input and a host sync, so only in that mode."""
    if torch.isfinite(x).all():
        return
    mixes_channels = cfg.mode != "independent" or cfg.deflation == "pca"  # the PCA basis spans all channels
    spread = ("every weight-gradient entry of this layer" if cfg.storage == "sketch" and mixes_channels
              else "the weight-gradient entries of the affected input channels, as in torch's layer")
    kept = "its sketch" if cfg.storage == "sketch" else "its quantized copy"
    warnings.warn(f"{layer}: non-finite input {list(x.shape)}: {kept} is not finite, and so will be {spread}",
                  RuntimeWarning, stacklevel=2)


def _estimate(x, weight, bias, geom: ConvGeometry, cfg: SketchConfig, seed: torch.Tensor, layer: str) -> torch.Tensor:
    """``XConvFunction`` with probe ``seed`` and the layer's probe count, or ``QuantizedConvFunction``
    for ``storage="quantized"``; ``layer`` names the layer in errors and warnings. Traceable by
    ``torch.compile`` (the seed is a tensor and the probes are counter-based, :mod:`xconv.rng`);
    anomaly mode's check runs eagerly only."""
    if not torch.compiler.is_compiling() and torch.is_anomaly_enabled():
        _warn_if_not_finite(x, cfg, layer)
    if cfg.storage == "quantized":
        return QuantizedConvFunction.apply(x, weight, bias, geom, cfg.bits, seed, layer)
    probes = layer_probes(cfg, x.shape)
    if probes != cfg.probes:
        cfg = dataclasses.replace(cfg, probes=probes)
    return XConvFunction.apply(x, weight, bias, geom, cfg, seed, layer)


class _XConvMixin:
    """Estimator options and the estimator forward shared by all XConv layers."""

    def _init_xconv(self, min_pixels: int | None = None, **options) -> None:
        """Validate and set the estimator ``options`` (the fields of :class:`SketchConfig`)."""
        canonical = validate_sketch_config(**options)
        if min_pixels is not None and (isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0):
            raise ValueError(f"min_pixels must be None or an int >= 0, got {min_pixels!r}")
        self.sketch_config = SketchConfig(**{**options, "mode": canonical})
        self.min_pixels = min_pixels

    @property
    def probes(self) -> int:
        return self.sketch_config.probes

    @probes.setter
    def probes(self, value: int) -> None:
        cfg = dataclasses.replace(self.sketch_config, probes=value)
        validate_sketch_config(**dataclasses.asdict(cfg))
        self.sketch_config = cfg

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

    def _run_estimator(self, x, geom: ConvGeometry) -> torch.Tensor:
        # last_seed: the seed of the last estimator forward, for the repeated-seed warning below.
        previous, seed = self.__dict__.get("last_seed"), draw_seed()
        self.last_seed = seed
        weight, bias = self.weight, self.bias
        cfg = self.sketch_config
        how = f"bits={cfg.bits} quantized" if cfg.storage == "quantized" else f"mode={cfg.mode!r}"
        if cfg.storage == "sketch" and cfg.deflation is not None:
            how += f", deflation={cfg.deflation!r}"
        layer = layer_label(self, f"weight {list(weight.shape)}, {how}")
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
                              RuntimeWarning, stacklevel=3)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Cast as autocast would for a conv, then run the Function without autocast so
            # probes and sketch live in the compute dtype.
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device, enabled=False):
                return _estimate(x, weight, bias, geom, self.sketch_config, seed, layer)
        return _estimate(x, weight, bias, geom, self.sketch_config, seed, layer)

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


def _ntuple(value, dims: int) -> tuple[int, ...]:
    """A conv option as a ``dims``-tuple: torch's functional convs also take a single int, which
    user code may set after construction (``conv.padding = 2``)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class _XConvNd(_XConvMixin):
    def estimator_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The input the estimator sees (and keeps a sketch or copy of) and its zero padding.

        Reads the options at call time exactly as torch's ``_conv_forward`` does, so options
        set after construction (``conv.padding = (2, 2)``, as output-stride conversion in
        segmentation encoders does) act alike: a non-zero ``padding_mode`` pads the input with
        torch's ``_reversed_padding_repeated_twice``; ``padding="same"`` is worked out from the
        current kernel size and dilation, and its asymmetric part (even kernels) is applied to the
        input first. The estimator then sees the padded input and symmetric zero padding, so
        Phi_k includes the padding exactly.

        Raises:
            ValueError: ``padding="same"`` with a stride other than 1 (as torch raises).
        """
        none = (0,) * (x.dim() - 2)
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), none
        if self.padding == "valid":
            return x, none
        if self.padding != "same":
            return x, _ntuple(self.padding, len(none))
        if any(s != 1 for s in _ntuple(self.stride, len(none))):
            raise RuntimeError(f"padding='same' is not supported for strided convolutions, got stride={self.stride}")
        totals = [d * (k - 1) for d, k in zip(_ntuple(self.dilation, len(none)), _ntuple(self.kernel_size, len(none)))]
        if all(t % 2 == 0 for t in totals):
            return x, tuple(t // 2 for t in totals)
        pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
        return F.pad(x, pads), none

    def _xconv_forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self.estimator_input(x)
        dims = x.dim() - 2
        geom = ConvGeometry(_ntuple(self.stride, dims), padding, _ntuple(self.dilation, dims), self.groups)
        return self._run_estimator(x, geom)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.uses_estimator(input):
            return super().forward(input)
        return self._xconv_forward(input)


class _XConvTransposeNd(_XConvMixin):
    def estimator_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The input the estimator sees: ``x`` itself, and the layer's padding."""
        return x, _ntuple(self.padding, x.dim() - 2)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not self.uses_estimator(input):
            return super().forward(input, output_size)
        spatial_dims = input.dim() - 2
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, spatial_dims, self.dilation
        )
        geom = ConvGeometry(
            _ntuple(self.stride, spatial_dims), _ntuple(self.padding, spatial_dims), _ntuple(self.dilation, spatial_dims),
            self.groups,
            transposed=True, output_padding=_ntuple(output_padding, spatial_dims),
        )
        return self._run_estimator(input, geom)


# xconv.rng.backward_count() at the last repeated-seed warning.
_REPEAT_WARNED_AT: list[int | None] = [None]


_DOC = """{torch_name} with a randomized, unbiased weight-gradient estimate (XConv).

    Same arguments, parameters and ``state_dict`` as ``torch.nn.{torch_name}``, plus:

    Args:
        probes: number of probing vectors r; 0 gives the exact gradient (plain layer).
        mode: ``"independent"`` keeps a per-channel sketch ``[B, C_in, r]``; ``"multi"``
            (alias ``"gaussian"``, the paper's name) keeps ``[B, r]``; ``"orthogonal"`` keeps
            ``[B, r]`` with per-channel orthonormal probe blocks.
        distribution: ``"gaussian"`` or ``"rademacher"`` probe entries.
        per_sample: independent mode only; separate probes per sample.
        contraction: ``"auto"``, ``"probes"`` or ``"decompress"`` (order of the backward
            contraction; same estimate, different cost).
        deflation: independent mode only; ``None``, ``"dct"`` (keep the lowest spatial
            frequencies exactly) or ``"pca"`` (keep the batch's dominant pixel subspace
            exactly; stores ``[k, n]`` floats per layer). The other probes are drawn in the
            complement: same sketch size, still unbiased, lower variance on smooth inputs.
        deflation_rank: number k of exactly kept directions, ``1 .. probes - 1``;
            ``None``: 1.
        storage: ``"sketch"`` (the paper's estimator) or ``"quantized"``: keep the input
            itself stochastically rounded to ``bits`` bits (unbiased; the sketch options and
            ``probes`` are then unused).
        bits: 2, 4, 8 or 16: bits per stored number of the quantized input (required with
            ``"quantized"``) or of the sketch; ``None``: the sketch in the input's dtype.
        max_compression: sketch only: each layer keeps at least ``ceil(H*W / max_compression)``
            probes (a cap on its compression); ``None``: ``probes`` everywhere.
        min_pixels: run the plain layer on inputs with fewer pixels than this; ``None``
            runs it wherever the sketch would not be smaller than the input.

    Forward output, input gradient and bias gradient equal the torch layer's; the weight
    gradient is an unbiased estimate with variance falling as 1/r (paper section 3), or, with
    quantized storage, ~4x per stored bit.

    Raises:
        TypeError, ValueError: invalid estimator options, at construction.

    Example:
        >>> layer = {name}(16, 32, 3, padding=1, probes=8)
        >>> x = torch.randn(4, 16, {example_shape}, requires_grad=True)
        >>> layer(x).sum().backward()
    """


class _XConvLayer(_XConvMixin):
    """The constructor shared by the XConv classes: the torch layer's arguments, then the estimator options."""

    def __init__(
        self, *args, probes: int = 8, mode: str = "independent", distribution: str = "gaussian",
        per_sample: bool = False, contraction: str = "auto", deflation: str | None = None,
        deflation_rank: int | None = None, storage: str = "sketch", bits: int | None = None,
        max_compression: int | None = None, min_pixels: int | None = None, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_xconv(
            min_pixels, probes=probes, mode=mode, distribution=distribution, per_sample=per_sample,
            contraction=contraction, deflation=deflation, deflation_rank=deflation_rank,
            storage=storage, bits=bits, max_compression=max_compression,
        )


class XConv1d(_XConvLayer, _XConvNd, nn.Conv1d):
    __doc__ = _DOC.format(torch_name="Conv1d", name="XConv1d", example_shape="20")


class XConv2d(_XConvLayer, _XConvNd, nn.Conv2d):
    __doc__ = _DOC.format(torch_name="Conv2d", name="XConv2d", example_shape="20, 20")


class XConv3d(_XConvLayer, _XConvNd, nn.Conv3d):
    __doc__ = _DOC.format(torch_name="Conv3d", name="XConv3d", example_shape="8, 8, 8")


class XConvTranspose1d(_XConvLayer, _XConvTransposeNd, nn.ConvTranspose1d):
    __doc__ = _DOC.format(torch_name="ConvTranspose1d", name="XConvTranspose1d", example_shape="20")


class XConvTranspose2d(_XConvLayer, _XConvTransposeNd, nn.ConvTranspose2d):
    __doc__ = _DOC.format(torch_name="ConvTranspose2d", name="XConvTranspose2d", example_shape="20, 20")


class XConvTranspose3d(_XConvLayer, _XConvTransposeNd, nn.ConvTranspose3d):
    __doc__ = _DOC.format(torch_name="ConvTranspose3d", name="XConvTranspose3d", example_shape="8, 8, 8")


#: torch layer class -> XConv class, used by :mod:`xconv.convert`.
XCONV_CLASSES = {
    nn.Conv1d: XConv1d, nn.Conv2d: XConv2d, nn.Conv3d: XConv3d,
    nn.ConvTranspose1d: XConvTranspose1d, nn.ConvTranspose2d: XConvTranspose2d,
    nn.ConvTranspose3d: XConvTranspose3d,
}


class BitLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` that keeps a 1-bit sign mask (8 per byte) for backward.

    Forward and gradient are identical to ``nn.LeakyReLU(negative_slope, inplace)``; the
    saved-for-backward memory is ``ceil(numel / 8)`` bytes instead of the input tensor
    (1/32 of an fp32 activation). Under ``torch.no_grad()`` it is the plain layer.

    Shape: any ``[*]`` in, same shape out.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        return BitLeakyReLUFunction.apply(input, self.negative_slope, self.inplace)


class BitReLU(nn.ReLU):
    """``nn.ReLU`` that keeps a 1-bit sign mask (8 per byte) for backward.

    Forward and gradient are identical to ``nn.ReLU(inplace)``; saved-for-backward memory
    is ``ceil(numel / 8)`` bytes (1/32 of an fp32 activation).

    Shape: any ``[*]`` in, same shape out.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        return BitLeakyReLUFunction.apply(input, None, self.inplace)
