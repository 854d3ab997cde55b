"""The stateless XConv API, shaped like :mod:`torch.nn.functional`.

Each function takes torch's arguments in torch's order, plus the keywords ``sketch`` and ``seed``.
With ``sketch=None``, under ``torch.no_grad()``, with a weight that does not require grad, or with
an unbatched input, a conv is exactly its ``torch.nn.functional`` namesake. Otherwise it keeps a
sketch of its input (or an SR low-bit copy, ``storage="quantized"``) instead of the input: forward
output, input gradient and bias gradient are torch's, and the weight gradient is an unbiased
estimate (Thatipelli et al., arXiv 2106.06998, section 3). The ``XConv*`` layers call these.

Example:
    >>> import xconv.functional as XF
    >>> x = torch.randn(4, 16, 20, 20)
    >>> w = torch.randn(32, 16, 3, 3, requires_grad=True)
    >>> XF.conv2d(x, w, padding=1, sketch=xconv.SketchConfig(probes=8)).sum().backward()
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import rng
from ._autograd import estimate
from ._bits import BitLeakyReLUFunction
from ._geometry import ConvGeometry, int_tuple, zero_padded
from ._options import SketchConfig

__all__ = ["bit_relu", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]

_CONV_DOC = """``torch.nn.functional.{torch_name}`` keeping a sketch of ``input`` for an unbiased weight gradient.

    Args:
        input: ``[B, C_in, {spatial}]`` (or unbatched ``[C_in, {spatial}]``: plain torch).
        weight: {weight_shape}.
        bias: ``[C_out]`` or None.
        {geometry}
        sketch: the estimator's options (:class:`xconv.SketchConfig`); None: plain torch.
        seed: the probes' seed, an int or an int64 scalar tensor; None draws one with
            :func:`xconv.rng.draw_seed` (the default CPU generator does not move). One seed gives
            one estimate: the ``XConv*`` layer drawing the same seed gives the same weight gradient.
        label: how errors and warnings name this call (layers pass their name).

    Returns:
        ``[B, C_out, {spatial_out}]``, equal to torch's output bit for bit.

    Raises:
        TypeError: ``sketch`` is not a :class:`xconv.SketchConfig`, or ``seed`` is not an int or int64 scalar.
        ValueError: {bad_geometry} (with a ``sketch``; without, torch checks them).
        RuntimeError: double backward through the estimate (what it keeps cannot give it){same}.
    """


def _estimates(dims: int, input: torch.Tensor, weight: torch.Tensor, sketch: SketchConfig) -> bool:
    """Whether a call keeps a sketch: grad mode, a weight that needs its gradient, a batched input and
    something to estimate with (``probes=0`` is the exact gradient)."""
    return (torch.is_grad_enabled() and weight.requires_grad and input.dim() == dims + 2
            and (sketch.probes > 0 or sketch.storage == "quantized"))


def _checked(sketch, seed, groups) -> None:
    if not isinstance(sketch, SketchConfig):
        raise TypeError(f"sketch must be None or an xconv.SketchConfig, got {type(sketch).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if seed is None or (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.dim() == 0):
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be None, an int or an int64 scalar tensor, got {seed!r}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in int64, got {seed}")


def _seed(seed) -> torch.Tensor:
    if seed is None:
        return rng.draw_seed()
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)


def _conv(dims, input, weight, bias, stride, padding, dilation, groups, sketch, seed, label):
    torch_conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    if sketch is None:
        return torch_conv(input, weight, bias, stride, padding, dilation, groups)
    _checked(sketch, seed, groups)
    stride, dilation = int_tuple("stride", stride, dims, 1), int_tuple("dilation", dilation, dims, 1)
    if not _estimates(dims, input, weight, sketch):
        if not isinstance(padding, str):
            padding = int_tuple("padding", padding, dims, 0, also=", 'valid' or 'same'")
        return torch_conv(input, weight, bias, stride, padding, dilation, groups)
    x, padding = zero_padded(input, padding, stride, dilation, weight.shape[2:])
    geom = ConvGeometry(stride, padding, dilation, groups)
    return estimate(x, weight, bias, geom, sketch, _seed(seed), label or f"xconv.functional.conv{dims}d")


def _conv_transpose(dims, input, weight, bias, stride, padding, output_padding, groups, dilation, sketch, seed, label):
    torch_conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    if sketch is None:
        return torch_conv(input, weight, bias, stride, padding, output_padding, groups, dilation)
    _checked(sketch, seed, groups)
    stride, dilation = int_tuple("stride", stride, dims, 1), int_tuple("dilation", dilation, dims, 1)
    padding = int_tuple("padding", padding, dims, 0)
    output_padding = int_tuple("output_padding", output_padding, dims, 0)
    if not _estimates(dims, input, weight, sketch):
        return torch_conv(input, weight, bias, stride, padding, output_padding, groups, dilation)
    geom = ConvGeometry(stride, padding, dilation, groups, transposed=True, output_padding=output_padding)
    return estimate(input, weight, bias, geom, sketch, _seed(seed), label or f"xconv.functional.conv_transpose{dims}d")


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, sketch=None, seed=None, label=None):
    return _conv(1, input, weight, bias, stride, padding, dilation, groups, sketch, seed, label)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, sketch=None, seed=None, label=None):
    return _conv(2, input, weight, bias, stride, padding, dilation, groups, sketch, seed, label)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, sketch=None, seed=None, label=None):
    return _conv(3, input, weight, bias, stride, padding, dilation, groups, sketch, seed, label)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     sketch=None, seed=None, label=None):
    return _conv_transpose(1, input, weight, bias, stride, padding, output_padding, groups, dilation, sketch, seed, label)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     sketch=None, seed=None, label=None):
    return _conv_transpose(2, input, weight, bias, stride, padding, output_padding, groups, dilation, sketch, seed, label)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     sketch=None, seed=None, label=None):
    return _conv_transpose(3, input, weight, bias, stride, padding, output_padding, groups, dilation, sketch, seed, label)


_CONV_GEOMETRY = """stride, padding, dilation, groups: as torch's; ``padding`` also ``"valid"`` or
            ``"same"`` (stride 1), worked out from the kernel and applied to the input first."""
_TRANSPOSE_GEOMETRY = """stride, padding, output_padding, groups, dilation: as torch's (ints or tuples)."""
for _dims, _spatial in ((1, "L"), (2, "H, W"), (3, "D, H, W")):
    _out = ", ".join(f"{s}_out" for s in _spatial.split(", "))
    _taps = ", ".join(f"k{s}" for s in _spatial.split(", ")).lower()
    globals()[f"conv{_dims}d"].__doc__ = _CONV_DOC.format(
        torch_name=f"conv{_dims}d", spatial=_spatial, spatial_out=_out, weight_shape=f"``[C_out, C_in / groups, {_taps}]``",
        geometry=_CONV_GEOMETRY, bad_geometry="``stride``, ``padding``, ``dilation`` or ``groups`` is not allowed",
        same="; ``padding='same'`` with a stride other than 1, as torch raises",
    )
    globals()[f"conv_transpose{_dims}d"].__doc__ = _CONV_DOC.format(
        torch_name=f"conv_transpose{_dims}d", spatial=_spatial, spatial_out=_out,
        weight_shape=f"``[C_in, C_out / groups, {_taps}]``", geometry=_TRANSPOSE_GEOMETRY,
        bad_geometry="``stride``, ``padding``, ``output_padding``, ``dilation`` or ``groups`` is not allowed", same="",
    )


def bit_relu(input: torch.Tensor, negative_slope: float | None = None, inplace: bool = False) -> torch.Tensor:
    """``torch.relu`` (``negative_slope=None``) or ``F.leaky_relu`` keeping a 1-bit mask for backward.

    The mask of ``input > 0`` is packed 8 per byte: ``ceil(numel / 8)`` bytes are kept instead of a
    tensor (1/32 of fp32). Output and gradient are torch's bit for bit (NaN inputs included). It is
    XConv's companion: a conv's input is usually a ReLU's output, which the ReLU would otherwise keep.
    Without grad mode or when ``input`` does not require grad it is the torch function.

    Args:
        input: any shape ``[*]``; the output has the same.
        negative_slope: None (ReLU) or a number (LeakyReLU's slope).
        inplace: as torch's.

    Raises:
        TypeError: ``negative_slope`` is not None or a number.
    """
    if negative_slope is not None and (isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float))):
        raise TypeError(f"negative_slope must be None (ReLU) or a number, got {negative_slope!r}")
    if not (torch.is_grad_enabled() and input.requires_grad):
        return F.relu(input, inplace) if negative_slope is None else F.leaky_relu(input, negative_slope, inplace)
    return BitLeakyReLUFunction.apply(input, negative_slope, inplace)
