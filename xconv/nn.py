"""XConv layers and 1-bit activations: drop-in subclasses of the torch layers.

Each ``XConv*`` is its ``torch.nn`` parent (same constructor, parameters, ``state_dict`` and
``repr``) plus the estimator options. Only the training forward changes: under
``torch.no_grad()``, with ``probes=0``, with a frozen weight, or where the sketch would not
be smaller than the input, the layer runs the parent's plain forward; otherwise it calls its
:mod:`xconv.functional` namesake, as ``nn.Conv2d`` calls ``F.conv2d``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as XF
from ._geometry import int_tuple, zero_padded
from ._layer import _XConvLayer, _XConvMixin


class _XConvNd(_XConvMixin):
    def estimator_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The input the estimator sees (and keeps a sketch or copy of) and its zero padding.

        Reads the options at call time exactly as torch's ``_conv_forward`` does, so options
        set after construction (``conv.padding = (2, 2)``, as output-stride conversion in
        segmentation encoders does) act alike: a non-zero ``padding_mode`` pads the input with
        torch's ``_reversed_padding_repeated_twice``; ``padding="same"`` is worked out from the
        current kernel size and dilation (:func:`xconv._geometry.zero_padded`).

        Raises:
            RuntimeError: ``padding="same"`` with a stride other than 1 (as torch raises).
        """
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0,) * (x.dim() - 2)
        return zero_padded(x, self.padding, self.stride, self.dilation, self.kernel_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.uses_estimator(input):
            return super().forward(input)
        padding = self.padding
        if self.padding_mode != "zeros":
            input, padding = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return self._xconv_forward(input, padding, *self._seed_and_label())


class _XConvTransposeNd(_XConvMixin):
    def estimator_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The input the estimator sees: ``x`` itself, and the layer's padding."""
        return x, int_tuple("padding", self.padding, x.dim() - 2, 0)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not self.uses_estimator(input):
            return super().forward(input, output_size)
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, input.dim() - 2, self.dilation
        )
        return self._xconv_forward(input, output_padding, *self._seed_and_label())


_DOC = """{torch_name} with a randomized, unbiased weight-gradient estimate (XConv).

    Same arguments, parameters and ``state_dict`` as ``torch.nn.{torch_name}``, plus:

    Args:
        sketch: a :class:`xconv.SketchConfig` holding the options below (the object
            ``xconv.functional`` takes), instead of giving them by name.
        probes: number of probing vectors r; 0 gives the exact gradient (plain layer); 8
            where neither ``probes`` nor ``sketch`` gives it.
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


class XConv1d(_XConvLayer, _XConvNd, nn.Conv1d):
    __doc__ = _DOC.format(torch_name="Conv1d", name="XConv1d", example_shape="20")

    def _xconv_forward(self, input, padding, seed, label):
        return XF.conv1d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                         sketch=self.sketch_config, seed=seed, label=label)


class XConv2d(_XConvLayer, _XConvNd, nn.Conv2d):
    __doc__ = _DOC.format(torch_name="Conv2d", name="XConv2d", example_shape="20, 20")

    def _xconv_forward(self, input, padding, seed, label):
        return XF.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                         sketch=self.sketch_config, seed=seed, label=label)


class XConv3d(_XConvLayer, _XConvNd, nn.Conv3d):
    __doc__ = _DOC.format(torch_name="Conv3d", name="XConv3d", example_shape="8, 8, 8")

    def _xconv_forward(self, input, padding, seed, label):
        return XF.conv3d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                         sketch=self.sketch_config, seed=seed, label=label)


class XConvTranspose1d(_XConvLayer, _XConvTransposeNd, nn.ConvTranspose1d):
    __doc__ = _DOC.format(torch_name="ConvTranspose1d", name="XConvTranspose1d", example_shape="20")

    def _xconv_forward(self, input, output_padding, seed, label):
        return XF.conv_transpose1d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                   self.groups, self.dilation, sketch=self.sketch_config, seed=seed, label=label)


class XConvTranspose2d(_XConvLayer, _XConvTransposeNd, nn.ConvTranspose2d):
    __doc__ = _DOC.format(torch_name="ConvTranspose2d", name="XConvTranspose2d", example_shape="20, 20")

    def _xconv_forward(self, input, output_padding, seed, label):
        return XF.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                   self.groups, self.dilation, sketch=self.sketch_config, seed=seed, label=label)


class XConvTranspose3d(_XConvLayer, _XConvTransposeNd, nn.ConvTranspose3d):
    __doc__ = _DOC.format(torch_name="ConvTranspose3d", name="XConvTranspose3d", example_shape="8, 8, 8")

    def _xconv_forward(self, input, output_padding, seed, label):
        return XF.conv_transpose3d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                   self.groups, self.dilation, sketch=self.sketch_config, seed=seed, label=label)


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
        return XF.bit_relu(input, self.negative_slope, self.inplace)


class BitReLU(nn.ReLU):
    """``nn.ReLU`` that keeps a 1-bit sign mask (8 per byte) for backward.

    Forward and gradient are identical to ``nn.ReLU(inplace)``; saved-for-backward memory
    is ``ceil(numel / 8)`` bytes (1/32 of an fp32 activation).

    Shape: any ``[*]`` in, same shape out.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return XF.bit_relu(input, None, self.inplace)
