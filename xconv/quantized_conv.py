"""Convolution that keeps its input in SR low-bit storage for the weight gradient.

The alternative to the paper's sketch at equal bytes (``../shared/design/storage.md``): the input
is stochastically rounded to ``b`` bits per element (:mod:`xconv.quantize`), so the stored copy
is unbiased, and backward hands the dequantized copy to the backend's own weight-gradient kernel:
every geometry, padding mode, group count and transposed conv is exact in structure, and the
weight-gradient estimate is unbiased with a variance that falls ~4x per stored bit.
"""
from __future__ import annotations

import torch

from . import rng
from .functional import ConvGeometry, _input_grad, _weight_grad, bias_grad, parameter_layout, refuse_double_backward
from .quantize import dequantize, quantize


class QuantizedConvFunction(torch.autograd.Function):
    """``aten.convolution`` whose backward computes ``dL/dW`` from an SR ``bits``-bit copy of the input.

    Forward output, input gradient and bias gradient are the exact ones; the weight gradient is
    the exact kernel applied to the stored copy, an unbiased estimate.
    Keeps: the weight, the packed codes (``bits / 8`` bytes per input element) and two bfloat16
    numbers per group of :data:`xconv.quantize.GROUP_SIZE` elements.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geom: ConvGeometry, bits: int, seed: torch.Tensor, layer: str):
        y = torch.ops.aten.convolution(x, weight, bias, *geom.conv_args())
        ctx.geom, ctx.x_shape, ctx.has_bias, ctx.layer, ctx.bits = geom, x.shape, bias is not None, layer, bits
        stored = quantize(x, bits, seed) if ctx.needs_input_grad[1] else None
        ctx.stored = None if stored is None else stored.layout()
        ctx.save_for_backward(weight, *(() if stored is None else stored.tensors()))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, *stored = ctx.saved_tensors
        refuse_double_backward(ctx.layer, f"its input in {ctx.bits}-bit SR storage")
        rng.advance()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_y, ctx.x_shape, weight, ctx.geom)
        if ctx.needs_input_grad[1]:
            x_hat = dequantize(ctx.stored.with_tensors(*stored))
            grad_w = parameter_layout(_weight_grad(grad_y, x_hat, weight, ctx.geom, ctx.geom.groups), weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = bias_grad(grad_y, ctx.x_shape, weight, ctx.geom)
        return grad_x, grad_w, grad_b, None, None, None, None
