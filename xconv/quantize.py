"""Unbiased low-bit storage of tensors: stochastic rounding (SR) to b bits, bit-packed.

A tensor is cut into groups of :data:`GROUP_SIZE` consecutive elements (in its memory order, so a
``channels_last`` tensor is grouped along channels without a copy). Each group keeps an offset
``lo`` and a step ``scale`` (bfloat16) and every element a ``b``-bit code

    code = floor((x - lo) / scale + u),  u ~ U[0, 1),   stored value  lo + scale * code

so ``E[stored] = x`` (unbiased) with per-element variance ``scale^2 f (1 - f) <= scale^2 / 4``,
``f`` the fractional part of ``(x - lo) / scale``. ``scale = (max - lo) / (2^b - 1)``: the
variance falls 4x per bit. 16 bits is bfloat16 with stochastic rounding (no groups). Groups of
64 (:data:`GROUP_SIZE`) cost 0.5 bit per element for ``lo`` and ``scale``; the measurement behind
the choice is in ``results/bench/README.md`` ("Low-bit storage").

Peers: ActNN (Chen et al., ICML 2021) and GACT (Liu et al., ICML 2022) store CNN activations
this way; this module is our own implementation of the idea.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Bits per stored element that :func:`quantize` accepts.
BITS = (2, 4, 8, 16)
#: Elements sharing one offset and scale.
GROUP_SIZE = 64


def check_bits(name: str, bits, allowed=BITS, none_ok: bool = True) -> None:
    """Raise a one-line ``TypeError``/``ValueError`` naming ``name`` unless ``bits`` is allowed."""
    if bits is None and none_ok:
        return
    ok = not isinstance(bits, bool) and isinstance(bits, int) and bits in allowed
    if not ok:
        allowed_text = ("None, " if none_ok else "") + ", ".join(map(str, allowed))
        error = ValueError if isinstance(bits, int) and not isinstance(bits, bool) else TypeError
        raise error(f"{name} must be one of {allowed_text}; got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes below ``2**bits`` (``bits`` in 2, 4, 8) into ``uint8 [numel * bits / 8]``.

    Element ``i`` goes to bits ``(i % (8 / bits)) * bits ..`` of byte ``i // (8 / bits)``;
    ``codes.numel()`` must be a multiple of ``8 / bits``.
    """
    per = 8 // bits
    rows = codes.reshape(-1, per)
    packed = rows[:, 0].clone()
    for j in range(1, per):
        packed |= rows[:, j] << (j * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [packed.numel() * 8 / bits]``."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)


def _memory_order(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` permuted so that it is contiguous (a view) and the permutation. A tensor that is not dense
    (a slice) is first copied densely in its own dimension order, so the restored tensor keeps its
    layout (``channels_last`` stays ``channels_last``)."""
    def ordered(t: torch.Tensor):
        perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
        return t.permute(perm), perm

    view, perm = ordered(x)
    if not view.is_contiguous():
        view, perm = ordered(x.clone(memory_format=torch.preserve_format))
    return (view, perm) if view.is_contiguous() else (x.contiguous(), tuple(range(x.dim())))


def _round_bf16(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` in bfloat16, rounded towards ``direction`` (``-inf`` or ``inf``) where not exact."""
    y = x.to(torch.bfloat16)
    wrong = y.to(x.dtype) > x if direction < 0 else y.to(x.dtype) < x
    return torch.where(wrong, torch.nextafter(y, torch.full_like(y, direction)), y)


def stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bfloat16 stochastically: up with probability equal to the fraction cut off.

    Unbiased (``E = x``) for finite ``x``: a uniform 16-bit integer is added to the magnitude
    bits of the fp32 value before they are cut to bfloat16's 16.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


@dataclass
class Quantized:
    """A tensor in SR low-bit storage (see the module docstring); :func:`dequantize` restores it.

    Attributes:
        codes: packed codes, ``uint8 [groups * GROUP_SIZE * bits / 8]`` (16 bits: the bfloat16
            values themselves).
        lo, scale: per-group offset and step, ``bfloat16 [groups]`` (None at 16 bits).
        shape, dtype: of the original tensor; ``perm`` its memory order (see ``_memory_order``).
    """

    codes: torch.Tensor
    lo: torch.Tensor | None
    scale: torch.Tensor | None
    bits: int
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    dtype: torch.dtype

    def tensors(self) -> tuple:
        """What must be kept: pass to ``ctx.save_for_backward`` and back to :meth:`with_tensors`."""
        return self.codes, self.lo, self.scale

    def with_tensors(self, codes, lo, scale) -> "Quantized":
        return Quantized(codes, lo, scale, self.bits, self.shape, self.perm, self.dtype)

    def layout(self) -> "Quantized":
        """This without its tensors: what an autograd ``ctx`` may hold beside ``save_for_backward``."""
        return self.with_tensors(None, None, None)

    @property
    def nbytes(self) -> int:
        """Bytes kept (codes, offsets and scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


def stored_bytes(numel: int, bits: int, group_size: int = GROUP_SIZE) -> int:
    """Bytes :func:`quantize` keeps for a tensor of ``numel`` elements at ``bits``."""
    if bits == 16:
        return 2 * numel
    groups = -(-numel // group_size)
    return groups * group_size * bits // 8 + 4 * groups


def _grid(x: torch.Tensor, bits: int):
    """``x`` in memory order, grouped: ``(t [groups, GROUP_SIZE], lo, scale, perm)``, where ``t`` is
    ``(x - lo) / scale`` in ``[0, 2^bits - 1]`` (``bits`` < 16) and ``lo``, ``scale`` are bfloat16."""
    ordered, perm = _memory_order(x.detach())
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = ordered.reshape(-1).to(compute)
    pad = (-flat.numel()) % GROUP_SIZE
    if pad:  # the last group repeats its last element: no new extremes
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    groups = flat.view(-1, GROUP_SIZE)
    lo = _round_bf16(groups.amin(1), -math.inf)
    scale = _round_bf16((groups.amax(1) - lo.to(compute)) / ((1 << bits) - 1), math.inf)
    step = scale.to(compute)[:, None]
    t = (groups - lo.to(compute)[:, None]) / torch.where(step > 0, step, 1)
    return t, lo, scale, ordered.shape, perm


def quantize(x: torch.Tensor, bits: int) -> Quantized:
    """Stochastically round ``x`` (any shape, floating) to ``bits`` bits per element.

    Draws its uniform noise from torch's default generator for ``x.device`` (as dropout
    does), so ``torch.manual_seed`` reproduces it. Temporaries: one fp32 copy of ``x``.

    Raises:
        ValueError: ``bits`` not in :data:`BITS`.
    """
    check_bits("bits", bits, none_ok=False)
    if bits == 16:
        ordered, perm = _memory_order(x.detach())
        return Quantized(stochastic_round_bf16(ordered), None, None, 16, tuple(ordered.shape), perm, x.dtype)
    t, lo, scale, shape, perm = _grid(x, bits)
    codes = (t + torch.rand_like(t)).floor_().clamp_(0, (1 << bits) - 1).to(torch.uint8)
    return Quantized(pack_codes(codes, bits), lo, scale, bits, tuple(shape), perm, x.dtype)


def rounding_variance(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The variance of each element of ``dequantize(quantize(x, bits))``: ``step^2 f (1 - f)``,
    ``f`` the fractional part of ``x``'s position on its grid; shape, layout and dtype of ``x``
    (fp32 for half-precision ``x``). Used to predict gradient errors without drawing."""
    check_bits("bits", bits, none_ok=False)
    if bits == 16:  # the magnitude is rounded between its bfloat16 neighbours towards zero and away
        magnitude = x.detach().float().abs()
        down = (magnitude.view(torch.int32) & -65536).view(torch.float32)
        up = torch.nextafter(down.to(torch.bfloat16), torch.tensor(math.inf, dtype=torch.bfloat16)).float()
        f = (magnitude - down) / (up - down)
        return (up - down).square() * f * (1 - f)
    t, _, scale, shape, perm = _grid(x, bits)
    f = t - t.floor()
    var = scale.to(t.dtype)[:, None].square() * f * (1 - f)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return var.view(-1)[: x.numel()].view(shape).permute(inverse)


def dequantize(q: Quantized) -> torch.Tensor:
    """The stored values of :func:`quantize` as a tensor of the original shape, strides and dtype."""
    if q.bits == 16:
        ordered = q.codes.to(q.dtype)
    else:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        codes = unpack_codes(q.codes, q.bits).view(q.lo.shape[0], GROUP_SIZE).to(compute)
        values = torch.addcmul(q.lo.to(compute)[:, None], q.scale.to(compute)[:, None], codes)
        ordered = values.view(-1)[: math.prod(q.shape)].view(q.shape).to(q.dtype)
    inverse = sorted(range(len(q.perm)), key=q.perm.__getitem__)
    return ordered.permute(inverse)
