"""Unbiased low-bit storage of tensors: stochastic rounding (SR) to b bits, bit-packed.

A tensor ``[B, C, *S]`` is cut into groups of :data:`GROUP_SIZE` pixels of one sample and channel
(a channel's image shorter than that is one group; fewer dims: groups along the last), so a
group never mixes channels of different scales. Each group keeps an offset ``lo`` and a step
``scale`` (bfloat16) and every element a ``b``-bit code

    code = floor((x - lo) / scale + u),  u ~ U[0, 1),   stored value  lo + scale * code

so ``E[stored] = x`` (unbiased up to float rounding: ``u`` has 16-bit resolution, four values per
64-bit hash (:mod:`xconv.rng`), worth ``2^-17`` of a step; ``(x - lo) / scale`` is computed as
``x * (1 / scale) + c``, off by up to about half an ulp of ``lo``, below ``x``'s own fp32
resolution) with per-element variance ``scale^2 f (1 - f) <= scale^2 / 4``,
``f`` the fractional part of ``(x - lo) / scale``. ``scale = (max - lo) / (2^b - 1)``: the
variance falls 4x per bit. Not unbiased at float32's ends, far from any activation: a group whose
range is below about 1e-36 (``1 / scale`` overflows) restores as ``lo``, one whose range exceeds
float32's maximum as NaN. 16 bits is bfloat16 with stochastic rounding (no groups). Groups of
64 (:data:`GROUP_SIZE`) cost 0.5 bit per element for ``lo`` and ``scale``; the measurement behind
the choice is in ``results/bench/README.md`` ("Low-bit storage").

Peers: ActNN (Chen et al., ICML 2021) and GACT (Liu et al., ICML 2022) store CNN activations
this way; this module is our own implementation of the idea.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _native, rng
from ._bits import pack_codes, unpack_codes

#: Bits per stored element that :func:`quantize` accepts.
BITS = (2, 4, 8, 16)
#: Elements sharing one offset and scale.
GROUP_SIZE = 64
# SR quantizing costs about four times a one-pass kernel per element (restoring, bfloat16 rounding),
# so it goes to the threads from smaller tensors than :data:`xconv._native.PARALLEL_MIN_ELEMENTS`.
_QUANTIZE_PARALLEL_MIN_ELEMENTS = 1 << 18


def check_bits(name: str, bits, allowed=BITS, none_ok: bool = True) -> None:
    """Raise a one-line ``TypeError``/``ValueError`` naming ``name`` unless ``bits`` is allowed."""
    if bits is None and none_ok:
        return
    ok = not isinstance(bits, bool) and isinstance(bits, int) and bits in allowed
    if not ok:
        allowed_text = ("None, " if none_ok else "") + ", ".join(map(str, allowed))
        error = ValueError if isinstance(bits, int) and not isinstance(bits, bool) else TypeError
        raise error(f"{name} must be one of {allowed_text}; got {bits!r}")


def _rows(shape) -> tuple[int, int]:
    """``(rows, n)``: a tensor of ``shape`` seen as rows that share a scale, ``n`` elements each: one row per
    sample and channel (``n`` pixels) for ``[B, C, *S]``, one per leading index for fewer dims."""
    n = math.prod(shape[2:]) if len(shape) >= 3 else (shape[-1] if shape else 1)
    return (math.prod(shape) // n if n else 0), n


def _group_size(n: int) -> int:
    """Elements per group in rows of ``n``: :data:`GROUP_SIZE`, or the row itself where it is shorter."""
    return max(1, min(GROUP_SIZE, n))


def _tiling(shape) -> tuple[int, int, int, int]:
    """``(rows, n, group, per_row)``: :func:`_rows` of ``shape``, the elements of each group and the
    groups of each row (its last one padded)."""
    rows, n = _rows(shape)
    group = _group_size(n)
    return rows, n, group, -(-n // group)


def _dense_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of a dense tensor in ``x``'s own dimension order (``channels_last`` stays so)."""
    return torch.empty_like(x, device="meta", memory_format=torch.preserve_format).stride()


def _round_bf16(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` (float32 or float64) in bfloat16, rounded towards ``direction`` (``-inf`` or ``inf``)
    where not exact.

    On the float32 bits: cutting the low 16 rounds the magnitude down; one more unit in bit 16
    rounds it up. Not ``nextafter`` on bfloat16: compiled code computes bfloat16 ops in float32,
    where the next value is float32's (and eager and compiled storage would differ)."""
    down = direction < 0
    x32 = x.float()
    if x.dtype == torch.float64:  # float32's nearest may lie on the wrong side of x
        wrong = x32.double() > x if down else x32.double() < x
        x32 = torch.where(wrong, torch.nextafter(x32, torch.full_like(x32, direction)), x32)
    bits = x32.view(torch.int32)
    cut = bits & -65536
    # Away from zero where bits were cut and the magnitude must grow: below zero going down, above going up.
    away = ((bits & 65535) != 0) & ((x32 < 0) if down else (x32 > 0)) & torch.isfinite(x32)
    rounded = torch.where(away, cut + 65536, cut)
    # bfloat16 is the high half of those bits. A cut NaN could read as inf: every NaN becomes the one
    # quiet NaN 0x7FC0 (torch's own conversions give 0x7FC0 or 0xFFFF, by kernel).
    rounded = torch.where(torch.isnan(x32), 0x7FC00000, rounded)
    return (rounded >> 16).to(torch.int16).view(torch.bfloat16)


def stochastic_round_bf16(x: torch.Tensor, key: torch.Tensor | int) -> torch.Tensor:
    """``x`` rounded to bfloat16 stochastically: up with probability equal to the fraction cut off.

    Unbiased (``E = x``) for finite ``x``: a uniform 16-bit integer (stream ``key``,
    :mod:`xconv.rng`) is added to the magnitude bits of the fp32 value before they are cut to
    bfloat16's 16. Eagerly on plain CPU tensors (of at most 32 bits; :func:`xconv._native.plain_eager`)
    :mod:`xconv._native`'s C kernel does it in one pass, with the same bits (a NaN as 0x7FC0; torch's
    conversions give 0x7FC0 or 0xFFFF, by kernel).
    """
    if _native.plain_eager(x) and _native_applies(x.device, x.dtype, x.numel()):
        return _round_bf16_native(_native.kernels(), x, key)
    bits = x.float().contiguous().view(torch.int32)
    noise = rng.uniform16(key, bits.numel(), x.device).view(bits.shape).to(torch.int32) + (1 << 15)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _round_bf16_native(lib, x: torch.Tensor, key: torch.Tensor | int) -> torch.Tensor:
    flat = x.float().contiguous()
    out = torch.empty(flat.shape, dtype=torch.bfloat16)
    key = int(key)
    _native.run_split(lambda h0, h1: lib.xconv_sr_bf16(flat.data_ptr(), flat.numel(), h0, h1, key, out.data_ptr()),
                      -(-flat.numel() // 4), 4)
    return out


@dataclass
class Quantized:
    """A tensor in SR low-bit storage (see the module docstring); :func:`dequantize` restores it.

    Attributes:
        codes: packed codes, ``uint8``, ``bits / 8`` bytes per element of the padded groups (16 bits:
            the bfloat16 values themselves).
        lo, scale: per-group offset and step, ``bfloat16 [groups]`` (None at 16 bits).
        shape, strides, dtype: of the original tensor (strides of its dense layout).
    """

    codes: torch.Tensor
    lo: torch.Tensor | None
    scale: torch.Tensor | None
    bits: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype

    def tensors(self) -> tuple:
        """What must be kept: pass to ``ctx.save_for_backward`` and back to :meth:`with_tensors`."""
        return self.codes, self.lo, self.scale

    def with_tensors(self, codes, lo, scale) -> "Quantized":
        return Quantized(codes, lo, scale, self.bits, self.shape, self.strides, self.dtype)

    def layout(self) -> "Quantized":
        """This without its tensors: what an autograd ``ctx`` may hold beside ``save_for_backward``."""
        return self.with_tensors(None, None, None)

    @property
    def nbytes(self) -> int:
        """Bytes kept (codes, offsets and scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


def stored_bytes(shape, bits: int) -> int:
    """Bytes :func:`quantize` keeps for a tensor of ``shape`` at ``bits``."""
    if bits == 16:
        return 2 * math.prod(shape)
    code_bytes, groups = _code_bytes_and_groups(shape, bits)
    return code_bytes + 4 * groups


def _code_bytes_and_groups(shape, bits: int) -> tuple[int, int]:
    """Bytes of the packed codes and number of groups (one bfloat16 ``lo`` and ``scale`` each) that
    :func:`quantize` keeps for a tensor of ``shape`` at ``bits`` below 16."""
    rows, _, group, per_row = _tiling(shape)
    groups = rows * per_row
    return -(-groups * group * bits // 8), groups


def _grid(x: torch.Tensor, bits: int, shift: float = 0.0):
    """``x`` grouped within its rows (:func:`_rows`): ``(t [groups, g], lo, scale)``, where ``t`` is
    ``(x - lo) / scale + shift`` (``t - shift`` in ``[0, 2^bits - 1]``) and ``lo``, ``scale`` are bfloat16.
    Groups never cross a channel: channels of different scales would share the coarser step."""
    rows, n = _rows(x.shape)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.detach().to(compute).reshape(rows, n)  # a copy for channels_last inputs
    group = _group_size(n)
    pad = (-n) % group
    if pad:  # each row repeats its last element: no new extremes
        flat = torch.cat([flat, flat[:, -1:].expand(rows, pad)], 1)
    groups = flat.reshape(-1, group)
    # amin and amax: ~8x faster than aminmax on the CPU. Zero extremes as +0: which of -0 and +0
    # a reduction returns depends on its order (the C kernels reduce in another).
    low, high = (torch.where(m == 0, 0.0, m) for m in (groups.amin(1), groups.amax(1)))
    lo = _round_bf16(low, -math.inf)
    scale = _round_bf16((high - lo.to(compute)) / ((1 << bits) - 1), math.inf)
    step = scale.to(compute)
    inverse = torch.where(step > 0, 1 / step, 0)
    # A product and a sum, each rounded once: a multiply-add kernel fuses them on some CPUs and not
    # on others, and the C kernels must store the same bits everywhere.
    t = torch.mul(groups, inverse[:, None]).add_((shift - lo.to(compute) * inverse)[:, None])
    return t, lo, scale


def _restore(values: torch.Tensor, shape, strides, dtype) -> torch.Tensor:
    """Rows of padded groups (``[rows, >= n]`` after a view) as a tensor of ``shape``, ``strides``, ``dtype``."""
    rows, n = _rows(shape)
    logical = values.reshape(rows, -1)[:, :n].reshape(shape)
    if logical.dtype == dtype and logical.stride() == tuple(strides):
        return logical
    return torch.empty_strided(shape, strides, dtype=dtype, device=values.device).copy_(logical)


def quantize(x: torch.Tensor, bits: int, key: torch.Tensor | int | None = None) -> Quantized:
    """Stochastically round ``x`` (any shape, floating) to ``bits`` bits per element.

    Its uniform noise is the counter-based stream ``key`` (an int64 scalar tensor,
    :func:`xconv.rng.key`), or, if None, of a seed from torch's default CPU generator
    (:func:`xconv.rng.draw_seed`, then :func:`xconv.rng.advance`: the generator moves as for any
    random op, ``torch.manual_seed`` reproduces the noise, and the call traces into
    ``torch.compile`` graphs). Temporaries: one fp32 copy of ``x``. On the CPU the C kernels of
    :mod:`xconv._native` store it in one pass per group (custom ops, called by compiled code too);
    other devices, and CPUs without them, run torch ops; both store the same bits.

    Raises:
        ValueError: ``bits`` not in :data:`BITS`.
    """
    check_bits("bits", bits, none_ok=False)
    if key is None:
        key = rng.draw_seed()
        rng.advance()
    elif isinstance(key, int):  # its low 64 bits, as the int64 tensors the C kernels and torch ops take
        key = rng._int64(key)
    shape, strides = tuple(x.shape), _dense_strides(x)
    if bits == 16:
        return Quantized(stochastic_round_bf16(x.detach(), key), None, None, 16, shape, strides, x.dtype)
    if _native_applies(x.device, x.dtype, x.numel()):
        codes, lo, scale = _native.direct(sr_quantize, _sr_quantize, x)(x.detach(), bits, torch.as_tensor(key))
        return Quantized(codes, lo, scale, bits, shape, strides, x.dtype)
    return _quantize_ops(x, bits, key, shape, strides)


def _native_applies(device: torch.device, dtype: torch.dtype, numel: int) -> bool:
    """Whether the C kernels (:mod:`xconv._native`) apply: CPU tensors of at most 32-bit floats, where
    they load; elsewhere the torch-op code runs, on every device."""
    return device.type == "cpu" and dtype != torch.float64 and numel > 0 and _native_loaded()


@torch.compiler.assume_constant_result
def _native_loaded() -> bool:
    """Whether the C kernels load here; traced code takes the answer as a constant (loading reads files)."""
    return _native.kernels() is not None


# The C kernels as custom ops: compiled code then calls them too, where it would run inductor's code
# for the torch ops (slower: results/bench/README.md, "torch.compile").
def _sr_quantize(x: torch.Tensor, bits: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensors :func:`quantize` keeps (codes, ``lo``, ``scale``) for a CPU tensor ``x``, by the C kernels."""
    return _quantize_native(_native.kernels(), x, bits, key, tuple(x.shape), x.stride()).tensors()


sr_quantize = torch.library.custom_op("xconv::sr_quantize", _sr_quantize, mutates_args=())


@sr_quantize.register_fake
def _(x: torch.Tensor, bits: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    code_bytes, groups = _code_bytes_and_groups(x.shape, bits)
    return (x.new_empty(code_bytes, dtype=torch.uint8),
            x.new_empty(groups, dtype=torch.bfloat16), x.new_empty(groups, dtype=torch.bfloat16))


def _sr_dequantize(codes: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, shape: list[int],
                   strides: list[int], dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize` of the stored tensors of a CPU tensor of ``shape``, ``strides`` and ``dtype``, by the C kernels."""
    return _dequantize_native(_native.kernels(), Quantized(codes, lo, scale, bits, tuple(shape), tuple(strides), dtype))


sr_dequantize = torch.library.custom_op("xconv::sr_dequantize", _sr_dequantize, mutates_args=())


@sr_dequantize.register_fake
def _(codes, lo, scale, bits: int, shape: list[int], strides: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(shape, strides, dtype=dtype, device=codes.device)


def _quantize_native(lib, x, bits, key, shape, strides) -> Quantized:
    rows, n, group, per_row = _tiling(shape)
    code_bytes, groups = _code_bytes_and_groups(shape, bits)
    flat = x.detach().to(torch.float32).reshape(rows, n).contiguous()  # a copy for channels_last inputs
    packed = torch.empty(code_bytes, dtype=torch.uint8)
    lo = torch.empty(groups, dtype=torch.bfloat16)
    scale = torch.empty(groups, dtype=torch.bfloat16)
    key = int(key)
    # threads split at groups whose first code starts a byte
    _native.run_split(lambda g0, g1: lib.xconv_sr_quantize(flat.data_ptr(), n, group, per_row, g0, g1, bits, key,
                                                           packed.data_ptr(), lo.data_ptr(), scale.data_ptr()),
                      groups, group, _QUANTIZE_PARALLEL_MIN_ELEMENTS, align=8 // bits)
    return Quantized(packed, lo, scale, bits, shape, strides, x.dtype)


def _quantize_ops(x, bits, key, shape, strides) -> Quantized:
    """:func:`quantize` in torch ops: what other devices (and CPUs without the C kernels) run, eagerly and
    compiled; the C kernels store the same bits."""
    # u = (k + 32768.5) / 2^16 for a uniform int16 k: uniform on [0, 1) at 16-bit resolution, so
    # E[code] is within 2^-17 of a step of t (fp32's rounding of t + u is of that order already).
    # t's own rounding is up to ~ulp(lo) / 2 in x's units: see the module docstring.
    t, lo, scale = _grid(x, bits, shift=0.5 + 2.0**-17)
    t.add_(rng.uniform16(key, t.numel(), t.device).view(t.shape), alpha=2.0**-16)
    # t + u is in [0, 2^b): after the clamp (float rounding only), truncation is the floor.
    codes = t.clamp_(0, (1 << bits) - 1).to(torch.uint8).reshape(-1)
    pad = (-codes.numel()) % (8 // bits)
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    return Quantized(pack_codes(codes, bits), lo, scale, bits, shape, strides, x.dtype)


def rounding_variance(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The variance of each element of ``dequantize(quantize(x, bits))``: ``step^2 f (1 - f)``,
    ``f`` the fractional part of ``x``'s position on its grid; shape and layout of ``x``, in its dtype
    (fp32 for half-precision ``x``). Used to predict gradient errors without drawing."""
    check_bits("bits", bits, none_ok=False)
    if bits == 16:  # the magnitude is rounded between its bfloat16 neighbours towards zero and away
        magnitude = x.detach().float().abs()
        down = (magnitude.view(torch.int32) & -65536).view(torch.float32)
        up = torch.nextafter(down.to(torch.bfloat16), torch.tensor(math.inf, dtype=torch.bfloat16)).float()
        f = (magnitude - down) / (up - down)
        return (up - down).square() * f * (1 - f)
    t, _, scale = _grid(x, bits)
    f = t - t.floor()
    var = scale.to(t.dtype)[:, None].square() * f * (1 - f)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return _restore(var, tuple(x.shape), _dense_strides(x), dtype)


def dequantize(q: Quantized) -> torch.Tensor:
    """The stored values of :func:`quantize` as a tensor of the original shape, layout and dtype."""
    if q.bits == 16:
        return torch.empty_strided(q.shape, q.strides, dtype=q.dtype, device=q.codes.device).copy_(q.codes)
    if _native_applies(q.codes.device, q.dtype, math.prod(q.shape)):
        restore = _native.direct(sr_dequantize, _sr_dequantize, q.codes)
        return restore(q.codes, q.lo, q.scale, q.bits, list(q.shape), list(q.strides), q.dtype)
    return _dequantize_ops(q)


def _dequantize_native(lib, q: Quantized) -> torch.Tensor:
    rows, n, group, per_row = _tiling(q.shape)
    out = torch.empty(rows, n, dtype=torch.float32)
    codes, lo, scale = (t.contiguous() for t in q.tensors())
    _native.run_split(lambda g0, g1: lib.xconv_sr_dequantize(codes.data_ptr(), lo.data_ptr(), scale.data_ptr(), n,
                                                             group, per_row, g0, g1, q.bits, out.data_ptr()),
                      rows * per_row, group, align=8 // q.bits)
    return _restore(out, q.shape, q.strides, q.dtype)


def _dequantize_ops(q: Quantized) -> torch.Tensor:
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = _group_size(_rows(q.shape)[1])
    codes = unpack_codes(q.codes, q.bits)[: q.lo.shape[0] * group].view(q.lo.shape[0], group).to(compute)
    # A product and a sum, as in _grid: the product is exact (8 by 8 bits) unless it overflows, where
    # a fused multiply-add would give a finite value and the C kernels inf.
    values = torch.mul(codes, q.scale.to(compute)[:, None]).add_(q.lo.to(compute)[:, None])
    return _restore(values, q.shape, q.strides, q.dtype)
