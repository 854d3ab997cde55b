"""The geometry of a convolution call: torch's arguments checked and made explicit.

The estimator sees symmetric zero padding only: ``padding="same"`` is worked out from the
kernel and its asymmetric part (even kernels) is applied to the input first, so ``Phi_k``
(``shared/design/estimator.md``, section 1) includes the padding exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

@dataclass(frozen=True)
class ConvGeometry:
    """Everything ``aten.convolution`` needs besides the tensors.

    ``padding`` is symmetric zero padding per spatial dim; other padding is applied to the
    input before the estimator (:func:`zero_padded`) so it is part of ``X``.
    """

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    def conv_args(self):
        out_pad = self.output_padding or (0,) * len(self.stride)
        return self.stride, self.padding, self.dilation, self.transposed, out_pad, self.groups



def int_tuple(name: str, value, dims: int, minimum: int, also: str = "") -> tuple[int, ...]:
    """``value`` as a ``dims``-tuple of ints: an int or a sequence of one or ``dims`` ints, as torch's
    convolutions take them, each ``>= minimum``.

    Raises:
        ValueError: anything else, in one line naming ``name`` (and ``also``, other allowed values).
    """
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(items) == 1:
        items *= dims
    if len(items) != dims or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in items):
        raise ValueError(f"{name} must be an int >= {minimum} or a tuple of {dims} such ints{also}, got {value!r}")
    return items


def zero_padded(x: torch.Tensor, padding, stride, dilation, taps) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input the estimator sees and its symmetric zero padding, for torch's ``padding`` argument.

    Args:
        x: ``[B, C_in, *S_in]``.
        padding: an int, a tuple of ints, ``"valid"`` or ``"same"``.
        stride, dilation, taps: ints or tuples (``taps``: the kernel's spatial shape).
    Returns:
        ``(x, padding)``; with ``"same"`` and an odd total padding (even kernels) ``x`` is padded
        on the far side first, as torch pads it.

    Raises:
        ValueError: ``padding`` is none of these.
        RuntimeError: ``padding="same"`` with a stride other than 1 (as torch raises).
    """
    dims = x.dim() - 2
    if not isinstance(padding, str):
        return x, int_tuple("padding", padding, dims, 0, also=", 'valid' or 'same'")
    if padding == "valid":
        return x, (0,) * dims
    if padding != "same":
        raise ValueError(f"padding must be an int >= 0, a tuple of {dims} such ints, 'valid' or 'same', got {padding!r}")
    if any(s != 1 for s in int_tuple("stride", stride, dims, 1)):
        raise RuntimeError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
    totals = [d * (k - 1) for d, k in zip(int_tuple("dilation", dilation, dims, 1), int_tuple("kernel_size", taps, dims, 1))]
    if all(t % 2 == 0 for t in totals):
        return x, tuple(t // 2 for t in totals)
    pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
    return F.pad(x, pads), (0,) * dims
