"""The exact convolution kernels the estimators call: weight, input and bias gradients.

The tap map ``Phi_k`` (stride, padding, dilation) is never formed: every contraction with it is
a call to torch's convolution kernels, so every geometry torch supports is handled by torch.
"""
from __future__ import annotations

import math

import torch

from ._cost import FLIP_MIN_PIXELS
from ._geometry import ConvGeometry


def weight_grad(grad_out, inp, weight, geom: ConvGeometry, groups: int) -> torch.Tensor:
    """``dL/dW`` of ``conv(inp, W)`` (or its transpose) for upstream ``grad_out``.

    ``weight`` is ``W`` or only its shape (a block of it); its values are never read. Given the
    tensor, oneDNN does not copy a zero-stride stand-in into a weight-sized buffer (2.8 of 23 ms
    for 512 channels at 4x4, batch 8).
    """
    stride, padding, dilation, transposed, out_pad, _ = geom.conv_args()
    if not isinstance(weight, torch.Tensor):
        weight = grad_out.new_empty(1).expand(weight)
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, None, stride, padding, dilation, transposed, out_pad, groups,
        (False, True, False),
    )[1]


def conv_backward(grad_out, inp, weight, geom: ConvGeometry, output_mask) -> tuple:
    """``(dL/dX, dL/dW, dL/db)`` of ``conv(inp, W)`` (or its transpose), those ``output_mask`` asks for
    (None for the others), in one call of torch's own backward kernel: what a plain torch layer's
    backward runs, given the input (SR storage restores one)."""
    stride, padding, dilation, transposed, out_pad, groups = geom.conv_args()
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, [grad_out.shape[1]] if output_mask[2] else None, stride, padding, dilation,
        transposed, out_pad, groups, output_mask,
    )


def input_grad(grad_out, input_shape, weight, geom: ConvGeometry) -> torch.Tensor:
    """``dL/dX`` of ``conv(X, W)`` (or its transpose): the adjoint convolution of ``grad_out``,
    ``[B, C_in, *S_in]`` for ``grad_out [B, C_out, *S_out]``.

    Not ``convolution_backward``: without the input it needs a stand-in, and on CPU it copies a
    stand-in of the input's size into a contiguous buffer (16 MiB for a 64->64 layer at 32x32,
    batch 64), the memory and time the sketch is there to save.
    """
    stride, padding, dilation, transposed, _, groups = geom.conv_args()
    if transposed:  # the adjoint of a transposed conv is the conv; its output has the input's size
        return torch.ops.aten.convolution(grad_out, weight, None, stride, padding, dilation, False,
                                          [0] * len(stride), groups)
    taps = weight.shape[2:]
    reach = [d * (k - 1) for d, k in zip(dilation, taps)]
    flip = (grad_out.device.type == "cpu" and math.prod(grad_out.shape[2:]) >= FLIP_MIN_PIXELS
            and all(s == 1 for s in stride) and all(r >= p for r, p in zip(reach, padding)))
    if flip:
        # At stride 1 the adjoint is a plain conv with the flipped, per-group transposed kernel,
        # which oneDNN runs faster than the transposed conv on large maps (see FLIP_MIN_PIXELS).
        # On CUDA the flip would be one more launch for no gain.
        flipped = (weight.unflatten(0, (groups, weight.shape[0] // groups)).transpose(1, 2).flatten(0, 1)
                   .flip(list(range(2, weight.dim()))))
        return torch.ops.aten.convolution(grad_out, flipped, None, stride, [r - p for r, p in zip(reach, padding)],
                                          dilation, False, [0] * len(stride), groups)
    # A strided conv drops the last (x + 2p - d(k-1) - 1) % s input rows; output padding gives them back.
    out_pad = [x - ((y - 1) * s - 2 * p + d * (k - 1) + 1) for x, y, s, p, d, k in
               zip(input_shape[2:], grad_out.shape[2:], stride, padding, dilation, taps)]
    return torch.ops.aten.convolution(grad_out, weight, None, stride, padding, dilation, True, out_pad, groups)


def bias_grad(grad_y: torch.Tensor) -> torch.Tensor:
    """The conv bias gradient ``[C_out]``: ``grad_y [B, C_out, *S_out]`` summed over all but dim 1,
    accumulated in float32 (float64 for float64) and returned in ``grad_y``'s dtype. It differs from
    the torch layer's by float rounding only. Not torch's own bias-only ``convolution_backward``: on
    CPU oneDNN computes the weight gradient with it and drops it, which cost as much as the exact
    weight and bias gradients together (``results/bench/README.md``, "torch.compile")."""
    dims = [0, *range(2, grad_y.dim())]
    accumulate = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    return grad_y.sum(dims, dtype=accumulate).to(grad_y.dtype)
