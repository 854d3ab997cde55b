"""Max-pool layers that keep only the argmax's position within its window for backward.

torch's ``max_pool*d_with_indices`` keeps the whole input and int64 indices (8 bytes per output
element). Backward needs only which window position won: ``ceil(log2(prod(kernel_size)))`` bits,
stored as 2, 4 or 8 bits per output element, packed (:func:`xconv._bits.pack_codes`). The C kernels
of :mod:`xconv._native` pool eager fp32 2-d inputs and find those positions in one pass.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple

from . import _native
from ._autograd import layer_label, refuse_double_backward
from ._bits import pack_codes, unpack_codes

#: Largest window (positions) whose offsets fit the 8-bit codes; larger ones run the torch layer.
MAX_WINDOW = 256
_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_BACKWARD = {
    2: torch.ops.aten.max_pool2d_with_indices_backward.grad_input,
    3: torch.ops.aten.max_pool3d_with_indices_backward.grad_input,
}


def _window_starts(out_shape, d: int, stride: int, padding: int, dtype, device) -> torch.Tensor:
    """Input coordinate of each window's first position along spatial dim ``d``, shaped to broadcast
    over ``out_shape``."""
    shape = [1] * len(out_shape)
    shape[d] = out_shape[d]
    return (torch.arange(out_shape[d], dtype=dtype, device=device) * stride - padding).view(shape)


def _index_dtype(in_shape) -> torch.dtype:
    """int32 where the in-plane indices fit: its divisions run several times faster than int64's on the CPU."""
    return torch.int32 if math.prod(in_shape) < 1 << 31 else torch.int64


def _digits(value: torch.Tensor, radices) -> list[torch.Tensor]:
    """The mixed-radix digits of ``value`` (most significant first; the first digit is not reduced):
    one division per digit but the first."""
    digits = []
    for radix in reversed(radices[1:]):
        quotient = value // radix
        digits.append(value - quotient * radix)
        value = quotient
    return [value, *reversed(digits)]


@functools.lru_cache(maxsize=256)
def _native_out_size(in_size, kernel, stride, padding, dilation, ceil_mode) -> tuple[int, int] | None:
    """The output size ``(OH, OW)`` of a 2-d max pool on planes of ``in_size``, by torch's own shape
    rule (its meta kernel), where :mod:`xconv._native`'s kernel computes torch's pool: every window
    has a position in the plane. None where not, or where torch refuses the arguments (its error
    is then raised by its own kernel)."""
    try:
        out = F.max_pool2d(torch.empty(1, 1, *in_size, device="meta"), kernel, stride, padding, dilation, ceil_mode).shape
    except (RuntimeError, ValueError):
        return None
    for size, o_size, k, s, p, d in zip(in_size, out[-2:], kernel, stride, padding, dilation):
        for o in range(o_size):
            start = o * s - p
            first = -(start // d) if start < 0 else 0  # as aten's `while (start < 0) start += d`
            if first >= k or start + first * d >= size:
                return None
    return tuple(out[-2:])


def _native_pool(x: torch.Tensor, kernel, stride, padding, dilation, ceil_mode):
    """``(kernels, (OH, OW))`` where the C kernels pool ``x`` as torch's CPU kernel would: eagerly on a
    plain tensor (:func:`xconv._native.plain_eager`), 2-d windows, fp32 CPU input ``[B, C, H, W]`` or
    ``[C, H, W]`` in the contiguous layout (:func:`xconv._native.kernels_for`; torch's ``cpu_max_pool``;
    not also channels-last, whose kernel lays out the output otherwise), every window with a position
    in the plane; else None."""
    if (len(kernel) != 2 or x.dim() not in (3, 4) or not _native.plain_eager(x)
            or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return None
    lib = _native.kernels_for(x)
    out_size = lib and _native_out_size(tuple(x.shape[-2:]), kernel, stride, padding, dilation, ceil_mode)
    return (lib, out_size) if out_size else None


def _flat(geometry) -> list[int]:
    """``(kernel, stride, padding, dilation)`` pairs as the C kernels take them: ``kh, kw, sh, sw, ...``."""
    return [v for pair in geometry for v in pair]


def _pool_native(x, lib, out_size, geometry, per: int):
    """``(y, codes)``: the pool's output and its winners' codes (``uint8``, zero-padded to a multiple of
    ``per``) by the C kernel, planes split across threads; ``geometry``: ``(kernel, stride, padding,
    dilation)``."""
    planes, (height, width) = math.prod(x.shape[:-2]), x.shape[-2:]
    y = x.new_empty((*x.shape[:-2], *out_size))
    codes = torch.zeros(-(-y.numel() // per) * per, dtype=torch.uint8)
    geometry = _flat(geometry)
    _native.run_split(lambda p0, p1: lib.xconv_max_pool2d(x.data_ptr(), height, width, p0, p1, *out_size, *geometry,
                                                          y.data_ptr(), codes.data_ptr()),
                      planes, height * width)
    return y, codes


def _pool_backward_native(grad_y, codes, ctx) -> torch.Tensor:
    """The input gradient from contiguous fp32 ``grad_y`` and the winners' ``codes`` by the C kernel."""
    lib, out_size = ctx.native
    planes, (height, width) = math.prod(ctx.x_shape[:-2]), ctx.x_shape[-2:]
    grad_x = grad_y.new_empty(ctx.x_shape)
    geometry = _flat(ctx.geometry)
    _native.run_split(lambda p0, p1: lib.xconv_max_pool2d_backward(grad_y.data_ptr(), codes.data_ptr(), height, width,
                                                                   p0, p1, *out_size, *geometry, grad_x.data_ptr()),
                      planes, height * width)
    return grad_x


def _memory_format(y: torch.Tensor) -> torch.memory_format:
    """The layout of the pool's output ``y``: torch's kernels give it and the input gradient the
    input's ``suggest_memory_format``."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(y.dim())
    if fmt is not None and not y.is_contiguous() and y.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


class XMaxPoolFunction(torch.autograd.Function):
    """``F.max_pool{2,3}d`` whose backward rebuilds the argmax indices from packed window offsets.

    The offset of an output's argmax is its mixed-radix position in the window, ``sum_d o_d *
    prod(kernel[d+1:])`` with ``o_d = (i_d - (p_d * stride_d - padding_d)) / dilation_d`` for
    input index ``i`` and output index ``p``. Eager fp32 2-d pools of contiguous CPU inputs run
    :mod:`xconv._native`'s kernels, which find the offsets directly (torch's values, winners and
    gradient sums; on the ResNet stem's 8x64x64x64 ~10x faster than torch's ``cpu_max_pool`` with
    indices, ~5x with backward: ``results/bench/README.md``); everything else runs torch's kernels.
    """

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode, layer):
        dims = len(kernel)
        bits = next(b for b in (2, 4, 8) if math.prod(kernel) <= 1 << b)
        native = _native_pool(x, kernel, stride, padding, dilation, ceil_mode)
        if native is not None:
            y, codes = _pool_native(x, *native, (kernel, stride, padding, dilation), 8 // bits)
        else:
            y, index = _POOL[dims](x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
            in_shape, out_shape = x.shape[-dims:], y.shape[-dims:]
            dtype = _index_dtype(in_shape)
            offset = 0
            for d, coord in enumerate(_digits(index.to(dtype), in_shape)):
                position = coord - _window_starts(out_shape, d, stride[d], padding[d], dtype, x.device)
                offset = offset * kernel[d] + (position // dilation[d] if dilation[d] > 1 else position)
            codes = offset.reshape(-1).to(torch.uint8)
            codes = F.pad(codes, (0, -codes.numel() % (8 // bits)))
        ctx.save_for_backward(pack_codes(codes, bits))
        ctx.bits, ctx.layer, ctx.memory_format, ctx.ceil_mode = bits, layer, _memory_format(y), ceil_mode
        ctx.geometry, ctx.native = (kernel, stride, padding, dilation), native
        ctx.x_shape, ctx.y_shape = x.shape, y.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward(ctx.layer, "only window offsets")
        (packed,) = ctx.saved_tensors
        codes = unpack_codes(packed, ctx.bits)
        if ctx.native is not None and _native.plain_eager(grad_y):
            return _pool_backward_native(grad_y.contiguous(), codes, ctx), None, None, None, None, None, None
        kernel, stride, padding, dilation = ctx.geometry
        dims = len(kernel)
        in_shape, out_shape = ctx.x_shape[-dims:], ctx.y_shape[-dims:]
        dtype = _index_dtype(in_shape)
        code = codes[: math.prod(ctx.y_shape)].view(ctx.y_shape).to(dtype)
        index = 0
        for d, position in enumerate(_digits(code, kernel)):
            start = _window_starts(out_shape, d, stride[d], padding[d], dtype, grad_y.device)
            index = index * in_shape[d] + start + position * dilation[d]
        index = index.long()  # the kernel's index type
        grad_x = torch.empty(ctx.x_shape, dtype=grad_y.dtype, device=grad_y.device, memory_format=ctx.memory_format)
        # torch's own backward kernel, so the sums where windows overlap are torch's on every
        # backend and dtype (on CPU bfloat16 rounds at each add; CUDA accumulates in fp32). It
        # reads only the sizes and layout of its input argument: the output buffer stands in.
        _BACKWARD[dims](grad_y, grad_x, kernel, stride, padding, dilation, ctx.ceil_mode, index, grad_input=grad_x)
        return grad_x, None, None, None, None, None, None


class _XMaxPoolMixin:
    def uses_offsets(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` keeps packed offsets: grad mode, ``x`` requires grad, no
        ``return_indices``, and a window of at most :data:`MAX_WINDOW` positions."""
        window = math.prod(_ntuple(self._dims)(self.kernel_size))
        return torch.is_grad_enabled() and x.requires_grad and not self.return_indices and window <= MAX_WINDOW

    def forward(self, input: torch.Tensor):
        if not self.uses_offsets(input):
            return super().forward(input)
        tup = _ntuple(self._dims)
        geometry = tup(self.kernel_size), tup(self.stride), tup(self.padding), tup(self.dilation)
        if self._dims == 1:  # as torch's max_pool1d_with_indices: a 2-d pool of height 1
            kernel, stride, padding, dilation = geometry
            geometry = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
            y = XMaxPoolFunction.apply(input.unsqueeze(-2), *geometry, self.ceil_mode, layer_label(self))
            return y.squeeze(-2)
        return XMaxPoolFunction.apply(input, *geometry, self.ceil_mode, layer_label(self))


_DOC = """``nn.{torch_name}`` that keeps only the argmax's window offset for backward.

    Same arguments, ``repr`` and (empty) ``state_dict`` as ``torch.nn.{torch_name}``. In grad mode
    with an input that requires grad, it keeps, per output element, the argmax's position in its
    pooling window in ``ceil(log2(prod(kernel_size)))`` bits rounded up to 2, 4 or 8 (packed; 4 bits
    for 3x3), instead of the input and int64 indices. Output and input gradient are torch's: eager
    fp32 2-d pools of contiguous CPU inputs by xconv's C kernels (torch's values, winners and sums),
    the rest by torch's forward kernel and its backward kernel on the indices rebuilt from the
    offsets. With ``return_indices=True``, windows over :data:`MAX_WINDOW` positions or no grad: the
    torch layer. Double backward raises ``RuntimeError``.

    Shape: as ``nn.{torch_name}``: ``[B, C, {spatial}]`` or unbatched ``[C, {spatial}]``.
    """


def _make_layer(name, base, dims, spatial):
    doc = _DOC.format(torch_name=base.__name__, spatial=spatial)
    return type(name, (_XMaxPoolMixin, base), {"_dims": dims, "__doc__": doc, "__module__": __name__})


XMaxPool1d = _make_layer("XMaxPool1d", nn.MaxPool1d, 1, "L")
XMaxPool2d = _make_layer("XMaxPool2d", nn.MaxPool2d, 2, "H, W")
XMaxPool3d = _make_layer("XMaxPool3d", nn.MaxPool3d, 3, "D, H, W")

#: torch layer class -> X class, for :mod:`xconv.convert`.
MAXPOOL_CLASSES = {nn.MaxPool1d: XMaxPool1d, nn.MaxPool2d: XMaxPool2d, nn.MaxPool3d: XMaxPool3d}
