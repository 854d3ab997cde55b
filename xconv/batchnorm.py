"""BatchNorm layers that keep their input for backward in SR low-bit storage (:mod:`xconv.quantize`).

In the U-Net, BatchNorm inputs are most of the activation memory left after XConv and the 1-bit
ReLU (``../shared/design/storage.md``). These layers keep a ``bits``-bit stochastically rounded
copy of the input instead of the input; forward output and running statistics are torch's own,
bit for bit, and backward runs torch's own kernel on the stored copy.

Op pair: ``aten._batch_norm_impl_index`` / ``aten._batch_norm_impl_index_backward``.
``F.batch_norm`` dispatches to ``aten.batch_norm``, which runs ``_batch_norm_impl_index``; that
picks the backend (cuDNN, MIOpen or native; ``native_batch_norm`` on CPU) and returns its index,
which ``_batch_norm_impl_index_backward`` uses to call the matching backward kernel
(``native_batch_norm_backward``, ``cudnn_batch_norm_backward`` with cuDNN's reserve, ...), the
kernels torch's autograd calls for ``F.batch_norm``. The newer ``_batch_norm_with_update`` /
``batch_norm_backward`` pair picks the same kernels but has no training variant without running
statistics (``_batch_norm_no_update`` is the eval op; on CPU in torch 2.14 it segfaults when
given none).
"""
from __future__ import annotations

import torch
from torch import nn

from . import rng
from ._autograd import layer_label, refuse_double_backward
from .rng import draw_seed
from .quantize import check_bits, dequantize, quantize


class XBatchNormFunction(torch.autograd.Function):
    """Training-mode ``F.batch_norm`` that keeps an SR ``bits``-bit copy of its input for backward.

    Keeps: the weight, the batch mean and inverse standard deviation from the forward kernel
    (exact), the backend's reserve (empty except for some cuDNN versions) and the quantized input.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, bits, seed, layer):
        y, mean, invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, True, momentum, eps, torch.backends.cudnn.enabled
        )
        # Groups must not mix channels: a [B, C] input is grouped along the batch, per channel.
        stored = quantize(x if x.dim() > 2 else x.t(), bits, seed)
        ctx.stored, ctx.impl, ctx.eps, ctx.layer = stored.layout(), impl, eps, layer
        ctx.save_for_backward(weight, mean, invstd, reserve, *stored.tensors())
        return y

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward(ctx.layer, f"its input in {ctx.stored.bits}-bit SR storage")
        rng.advance()
        weight, mean, invstd, reserve, *stored = ctx.saved_tensors
        x_hat = dequantize(ctx.stored.with_tensors(*stored))
        x_hat = x_hat if x_hat.dim() > 2 else x_hat.t()
        grads = torch.ops.aten._batch_norm_impl_index_backward(
            ctx.impl, x_hat, grad_y, weight, None, None, mean, invstd, True, ctx.eps,
            list(ctx.needs_input_grad[:3]), reserve,
        )
        return (*grads, None, None, None, None, None, None, None)


class _XBatchNormMixin:
    def _init_bits(self, bits) -> None:
        check_bits("bits", bits, none_ok=False)
        self.bits = bits

    def uses_stored_input(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` keeps the quantized input: it normalizes with batch
        statistics, in grad mode, with the input or a parameter requiring grad. Inputs with one
        value per channel (or none) go to the torch layer, which raises or handles them."""
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        wants_grad = x.requires_grad or any(p is not None and p.requires_grad for p in (self.weight, self.bias))
        return (
            batch_stats and wants_grad and torch.is_grad_enabled() and x.dim() >= 2 and x.numel() > x.shape[1]
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.uses_stored_input(input):
            return super().forward(input)
        self._check_input_dim(input)
        # The running-statistics bookkeeping of nn.modules.batchnorm._BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        track = self.training and self.track_running_stats
        if track and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        running_mean, running_var = (self.running_mean, self.running_var) if track else (None, None)
        return XBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, factor, self.eps, self.bits, draw_seed(),
            layer_label(self),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}"


_DOC = """``nn.{torch_name}`` that keeps its input in SR ``bits``-bit storage for backward.

    Same arguments, parameters, buffers and ``state_dict`` as ``torch.nn.{torch_name}``, plus
    ``bits`` (keyword; 2, 4, 8 or 16, default 8). Where it normalizes with batch statistics (training,
    or no running buffers) in grad mode with the input or a parameter requiring grad, it keeps
    the SR copy of the input (:func:`xconv.quantize.quantize`: ``bits / 8`` bytes per element plus
    4 bytes per group of 64; 16 bits: bfloat16), the weight and the exact batch mean and inverse
    standard deviation, instead of the input; otherwise it is the torch layer.

    Forward output and running statistics (momentum, cumulative averaging, ``num_batches_tracked``)
    are torch's, bit for bit (its own kernel). Backward is torch's kernel on the stored copy
    ``x + e``, ``E[e] = 0``, with the exact statistics ``mu``, ``s = 1 / std``:

    - bias gradient ``sum(dy)``: exact;
    - weight gradient ``sum(dy * (x + e - mu) s)``: linear in the copy, unbiased, variance
      ``sum(s^2 dy^2 Var(e))``, ~4x lower per stored bit;
    - input gradient ``w s (dy - mean(dy) - xh * mean(dy * xh))`` with ``xh = (x + e - mu) s``:
      quadratic in the copy; the product of ``e_i`` in ``xh_i`` and in the mean gives the bias
      ``E[dx_i] - dx_i = -w s^3 dy_i Var(e_i) / N``, ``N`` elements per channel: relative to the
      gradient about ``Var(e) / (N var(x))`` (``Var(e) <= scale^2 / 4``); on Gaussian inputs
      0.47 / N at 2 bits, 0.019 / N at 4, 7e-5 / N at 8 (1e-5, 6e-7, 2e-9 for 32x32 maps at
      batch 32; ``tests/test_xconv_batchnorm.py`` checks the term).

    Double backward raises ``RuntimeError``.

    Shape: as ``nn.{torch_name}``: {shape}.

    Raises:
        TypeError, ValueError: ``bits`` not one of 2, 4, 8, 16, at construction.

    Example:
        >>> layer = {name}(16, bits=4)
        >>> x = torch.randn(8, 16, {example_shape}, requires_grad=True)
        >>> layer(x).sum().backward()
    """


class _XBatchNormLayer(_XBatchNormMixin):
    """The constructor shared by the XBatchNorm classes: the torch layer's arguments, then ``bits``."""

    def __init__(self, *args, bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_bits(bits)


class XBatchNorm1d(_XBatchNormLayer, nn.BatchNorm1d):
    __doc__ = _DOC.format(torch_name="BatchNorm1d", name="XBatchNorm1d", shape="``[B, C]`` or ``[B, C, L]``",
                          example_shape="20")


class XBatchNorm2d(_XBatchNormLayer, nn.BatchNorm2d):
    __doc__ = _DOC.format(torch_name="BatchNorm2d", name="XBatchNorm2d", shape="``[B, C, H, W]``",
                          example_shape="10, 10")


class XBatchNorm3d(_XBatchNormLayer, nn.BatchNorm3d):
    __doc__ = _DOC.format(torch_name="BatchNorm3d", name="XBatchNorm3d", shape="``[B, C, D, H, W]``",
                          example_shape="4, 6, 6")

#: torch layer class -> X class, for :mod:`xconv.convert`.
BATCHNORM_CLASSES = {nn.BatchNorm1d: XBatchNorm1d, nn.BatchNorm2d: XBatchNorm2d, nn.BatchNorm3d: XBatchNorm3d}
