"""Bit packing (1-bit masks, 2/4/8-bit codes) and the 1-bit-mask (leaky) ReLU Function."""
from __future__ import annotations

import functools
import math

import torch

from . import _native

# The 1-bit activations' backward unpacks at most this many mask elements (or one sample) at once.
SIGN_CHUNK_ELEMENTS = 2**20
# Multiplying eight 0/1 bytes read as one little-endian int64 by this constant gathers
# byte i into bit i of the top byte: no two partial products meet there or carry into it.
_GATHER_BITS = 0x0102040810204080


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes below ``2**bits`` (``bits`` in 2, 4, 8) into ``uint8 [numel * bits / 8]``.

    Element ``i`` goes to bits ``(i % (8 / bits)) * bits ..`` of byte ``i // (8 / bits)``;
    ``codes`` must be contiguous with ``numel`` a multiple of ``8 / bits``.
    """
    per = 8 // bits
    if per == 1:
        return codes
    # The codes of one byte read as one little-endian int16 (4 bits) or int32 (2 bits) word: shifting
    # the word right moves code j from bit 8 j to bit j * bits of the low byte, which the cast keeps.
    word = codes.view(torch.int16 if per == 2 else torch.int32)
    packed = word.clone()
    for j in range(1, per):
        packed |= word >> (j * (8 - bits))
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [packed.numel() * 8 / bits]``."""
    per = 8 // bits
    if per == 1:
        return packed
    # The reverse of pack_codes' shifts: each byte widened to a word, code j shifted left to bit 8 j
    # and masked there, the word read back as its per little-endian bytes.
    word = packed.to(torch.int16 if per == 2 else torch.int32)
    codes = word.clone()
    for j in range(1, per):
        codes |= word << (j * (8 - bits))
    codes &= sum(((1 << bits) - 1) << (8 * j) for j in range(per))
    return codes.view(torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor 8 per byte: ``uint8 [ceil(numel / 8)]``, element i in bit i % 8."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER_BITS) >> 56).to(torch.uint8)


def _sign_bits(x: torch.Tensor, leaky: bool) -> torch.Tensor:
    """The 1-bit (leaky) ReLU's mask of ``x [*]``, packed by :func:`pack_bits` (``uint8 [ceil(numel / 8)]``):
    where ``x > 0`` (``leaky``), else where ``x <= 0`` is false (a NaN passes the gradient, as in
    torch's ReLU backward, and not in its leaky one).

    A custom op so that ``torch.compile`` keeps its result for backward: as plain ops, the partitioner
    recomputed the mask and its packing from the saved BatchNorm input inside the BatchNorm backward
    kernel, in code that does not vectorise (``results/bench/README.md``, "torch.compile"). Contiguous
    fp32 CPU tensors run :mod:`xconv._native`'s C kernel (one pass; the same bits as the torch ops)."""
    lib = _native.kernels_for(x)
    if lib is None:
        return pack_bits(x > 0 if leaky else (x <= 0).logical_not_())
    packed = torch.empty(-(-x.numel() // 8), dtype=torch.uint8)
    _native.run_split(lambda b0, b1: lib.xconv_sign_bits(x.data_ptr(), x.numel(), b0, b1, leaky, packed.data_ptr()),
                      packed.numel(), 8)
    return packed


sign_bits = torch.library.custom_op("xconv::sign_bits", _sign_bits, mutates_args=())


@sign_bits.register_fake
def _(x: torch.Tensor, leaky: bool) -> torch.Tensor:
    return x.new_empty(-(-x.numel() // 8), dtype=torch.uint8)


@functools.lru_cache(maxsize=None)
def _unpack_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[256, 8]`` in ``dtype``: the bits (1 or 0) of every byte value."""
    return ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(device=device, dtype=dtype)


def unpack_bits(packed: torch.Tensor, shape, dtype: torch.dtype = torch.bool, start: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: elements ``start .. start + prod(shape)`` of the packed
    mask as a tensor of ``shape`` in ``dtype`` (True/False, or 1/0)."""
    count = math.prod(shape)
    first, end = start // 8, -(-(start + count) // 8)
    if torch.compiler.is_compiling():
        # Traced only by a double backward (create_graph=True; the first-order backward is a custom op):
        # shifts of int32 words vectorise in inductor's code, the table gather does not (8x slower
        # fused into a BatchNorm backward); eagerly the table is faster.
        shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
        bits = ((packed[first:end].to(torch.int32)[:, None] >> shifts) & 1).to(dtype)
    else:
        bits = _unpack_table(packed.device, dtype).index_select(0, packed[first:end].long())
    offset = start - 8 * first
    return bits.view(-1)[offset : offset + count].view(shape)


def _sign_bits_backward(grad: torch.Tensor, packed: torch.Tensor, negative_slope: float | None) -> torch.Tensor:
    """The (leaky) ReLU's input gradient from the output gradient ``grad [B, *]`` and the :func:`sign_bits`
    mask of its input: ``grad`` where the mask is set, else 0 (``negative_slope`` None) or
    ``negative_slope * grad``. A custom op, so that compiled code runs these vectorised kernels too
    (inductor's unpacking, fused into the next kernel, was slower: ``results/bench/README.md``)."""
    lib = _native.kernels_for(grad)
    if lib is not None:  # one pass, the same values as aten's kernels below
        grad_x = torch.empty_like(grad)
        slope = 0.0 if negative_slope is None else negative_slope
        _native.run_split(lambda b0, b1: lib.xconv_sign_bits_backward(grad.data_ptr(), packed.data_ptr(), grad.numel(),
                                                                      b0, b1, negative_slope is None, slope,
                                                                      grad_x.data_ptr()),
                          packed.numel(), 8)
        return grad_x
    # aten's (leaky) ReLU backward kernels are vectorised where torch.where is not (3x
    # faster on CPU, 8x64x64x64 floats: 3.9 vs 12.5 ms) but read the sign from a tensor of
    # the gradient's dtype: the mask is unpacked straight into that dtype a few samples at
    # a time, so no mask-sized temporary exists (1.7 ms less per 8x64x64x64 than unpacking
    # to bool and casting).
    grad_x = torch.empty_like(grad)
    per_sample = math.prod(grad.shape[1:])
    step = max(1, SIGN_CHUNK_ELEMENTS // max(1, per_sample))
    for b0 in range(0, grad.shape[0], step):
        b1 = min(grad.shape[0], b0 + step)
        sign = unpack_bits(packed, (b1 - b0, *grad.shape[1:]), grad.dtype, start=b0 * per_sample)
        if negative_slope is None:
            torch.ops.aten.threshold_backward.grad_input(grad[b0:b1], sign, 0, grad_input=grad_x[b0:b1])
        else:
            torch.ops.aten.leaky_relu_backward.grad_input(grad[b0:b1], sign, negative_slope, False,
                                                          grad_input=grad_x[b0:b1])
    return grad_x


sign_bits_backward = torch.library.custom_op("xconv::sign_bits_backward", _sign_bits_backward, mutates_args=())


@sign_bits_backward.register_fake
def _(grad: torch.Tensor, packed: torch.Tensor, negative_slope: float | None) -> torch.Tensor:
    return torch.empty_like(grad)


class BitLeakyReLUFunction(torch.autograd.Function):
    """(Leaky) ReLU that keeps a 1-bit sign mask for backward instead of a tensor.

    ``negative_slope=None`` is ``torch.relu``: the gradient is ``grad`` except where ``x <= 0``.
    A number is ``torch.nn.functional.leaky_relu``: ``grad`` where ``x > 0``, else
    ``negative_slope * grad``. (The two differ at NaN inputs, and so do their masks.)
    """

    @staticmethod
    def forward(ctx, x, negative_slope: float | None, inplace: bool):
        relu = negative_slope is None
        packed = _native.direct(sign_bits, _sign_bits, x)(x, not relu)  # before an in-place ReLU overwrites x
        if inplace:
            ctx.mark_dirty(x)
            x.relu_() if relu else torch.nn.functional.leaky_relu_(x, negative_slope)
            y = x  # torch.compile traces mark_dirty only where forward returns the dirty input itself
        else:
            y = x.relu() if relu else torch.nn.functional.leaky_relu(x, negative_slope)
        ctx.shape, ctx.negative_slope = x.shape, negative_slope
        ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        shape = ctx.shape if len(ctx.shape) else (1,)  # a scalar is walked as one row
        grad = grad_y.reshape(shape)
        if torch.is_grad_enabled():
            # create_graph=True (gradient penalties): the backward is linear in grad_y with a constant
            # mask, so a differentiable where() gives double backward; the mask is unpacked whole.
            mask = unpack_bits(packed, shape)
            other = 0.0 if ctx.negative_slope is None else grad * ctx.negative_slope
            return torch.where(mask, grad, other).view(grad_y.shape), None, None
        grad_x = _native.direct(sign_bits_backward, _sign_bits_backward, grad)(grad, packed, ctx.negative_slope)
        # not a view where it need not be: autograd sums a non-view gradient into another in place
        return (grad_x if grad_x.shape == grad_y.shape else grad_x.view(grad_y.shape)), None, None
