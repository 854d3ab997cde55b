"""Counter-based random numbers: every random number xconv draws is a hash of ``(key, index)``.

Forward and backward must see the same probes without storing them, on any device, in eager
and in compiled code alike. A ``torch.Generator`` cannot give that inside ``torch.compile``
(it is an opaque object, and its draws are replaced by the compiler's own random numbers), so
the numbers here are made of integer tensor ops: entry ``i`` of a stream with key ``k`` is
splitmix64's finalizer applied to the state ``((i + 1) xor k) * gamma`` (Steele, Lea and Flood,
"Fast splittable pseudorandom number generators", OOPSLA 2014). The same
ops run in eager and in compiled code, so both give the same bits, and no tensor is read back
to the host.

Seeds are int64 scalar tensors. Eagerly, :func:`draw_seed` derives one from the state of torch's
default CPU generator without moving it, so ``torch.manual_seed`` and Lightning's
``seed_everything`` reproduce every stream and random ops after a converted layer (dropout) draw
what they draw in the unconverted model; each backward that used a seed then takes one number from
the generator (:func:`advance`), so the next step's seeds are new. A GPU's generator is never
used. :func:`key` derives independent streams from one seed.
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch


_MASK = (1 << 64) - 1


def _int64(value: int) -> int:
    """The signed int64 with the low 64 bits of ``value``: torch's int64 arithmetic wraps modulo 2^64."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


# splitmix64's increment (the golden ratio in 64-bit fixed point) and finalizer multipliers;
# tensors take the multipliers as the signed int64s with the same bits.
_GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SIGNED_MIX1, _SIGNED_MIX2 = _int64(_MIX1), _int64(_MIX2)
# Eager hashing works on blocks of this many int64 values in place, so each of the finalizer's
# passes runs in cache (a whole-tensor pass per op is memory bound); compiled code fuses the ops.
_BLOCK = 1 << 15


# Every seed drawn in compiled code is added in here. That makes each draw part of the forward
# graph's outputs (a mutated global), so the compiler keeps the drawn value for backward: a draw that
# no forward output needs is treated as free to recompute in the backward graph (torch 2.14's
# partitioners), where it would give other probes than the sketch's and a biased estimate.
_SEED_SINK = torch.zeros((), dtype=torch.int64)


class _DrawCount:
    """Which generator state the last eager seed was derived from, and how many seeds were derived
    from it: layers that draw while nothing moves the generator (one forward's convs, say) get the
    seeds of counts 0, 1, 2, ... of one state."""

    fingerprint: bytes | None = None
    draws = 0
    backwards = 0  # calls of advance()


def _fingerprint(state: torch.Tensor) -> bytes:
    try:
        data = state.numpy()
    except RuntimeError as err:  # inside torch.func's transforms the state has no readable storage
        raise RuntimeError("XConv layers cannot read torch's generator state here (inside a torch.func transform "
                           "such as grad or vmap?): their estimators support torch.autograd (backward, "
                           "torch.autograd.grad) only") from err
    return hashlib.blake2b(data, digest_size=8).digest()


def _seed(fingerprint: bytes, draw: int) -> int:
    return _finalize_int((int.from_bytes(fingerprint, "little") + (draw + 1) * _GAMMA) & _MASK) >> 2


def state_seed(state: torch.Tensor, draw: int) -> int:
    """The seed of the ``draw``-th (from 0) eager :func:`draw_seed` at CPU generator state ``state``
    (``torch.get_rng_state()``, uint8 [5056]): a 62-bit int hashed from both."""
    return _seed(_fingerprint(state), draw)


def draw_seed() -> torch.Tensor:
    """An int64 scalar tensor in [0, 2^62), from torch's default CPU generator.

    Eagerly it is :func:`state_seed` of the generator's state and of the number of seeds already
    derived from that state, and the generator does not move: a forward draws no random number
    that an unconverted model would not (dropout masks stay bit for bit). ``torch.manual_seed``
    reproduces the seeds as long as every forward that drew seeds was followed by its backward
    (which calls :func:`advance`). In compiled code, where the state cannot be read, it is a
    ``torch.randint`` draw (traceable, no host read), which moves the generator."""
    if torch.compiler.is_compiling():
        seed = torch.randint(0, 1 << 62, (), dtype=torch.int64)
        _SEED_SINK.add_(seed)
        return seed
    fingerprint = _fingerprint(torch.get_rng_state())
    if fingerprint == _DrawCount.fingerprint:
        _DrawCount.draws += 1
    else:
        _DrawCount.fingerprint, _DrawCount.draws = fingerprint, 0
    return torch.tensor(_seed(fingerprint, _DrawCount.draws), dtype=torch.int64)


def draw_count() -> tuple[bytes | None, int]:
    """Where the eager seed count of :func:`draw_seed` stands, for :func:`replayed_draw_count`."""
    return _DrawCount.fingerprint, _DrawCount.draws


@contextlib.contextmanager
def replayed_draw_count(count: tuple[bytes | None, int]):
    """Within the block, the seed count is ``count`` (from :func:`draw_count`), and afterwards what it
    was before: a recomputed forward (activation checkpointing) run with the generator state of the
    original forward and that forward's count derives the same seeds."""
    saved = draw_count()
    _DrawCount.fingerprint, _DrawCount.draws = count
    try:
        yield
    finally:
        _DrawCount.fingerprint, _DrawCount.draws = saved


def advance() -> None:
    """Called by every backward whose forward drew a seed: eagerly, take one number from the default
    CPU generator and restart the count of :func:`draw_seed`. Without the draw, steps where nothing
    else draws would repeat their seeds (the generator would never move); without the restart,
    ``torch.manual_seed`` with an earlier seed would find that state already counted."""
    if torch.compiler.is_compiling():
        return
    torch.randint(0, 2, (), dtype=torch.int64)
    _DrawCount.fingerprint = None
    _DrawCount.backwards += 1


def backward_count() -> int:
    """How many backwards have called :func:`advance` in this process (eagerly): the layers of one
    forward see one value."""
    return _DrawCount.backwards


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """``z >> k`` on the 64 bits as unsigned (torch's ``>>`` on int64 copies the sign bit)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _finalize_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer of each element, in place."""
    z ^= _shift_right(z, 30)
    z *= _SIGNED_MIX1
    z ^= _shift_right(z, 27)
    z *= _SIGNED_MIX2
    z ^= _shift_right(z, 31)
    return z


def _finalize_int(z: int) -> int:
    """splitmix64's finalizer of an unsigned 64-bit Python int."""
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK
    return z ^ (z >> 31)


def key(seed: torch.Tensor | int, *streams: int) -> torch.Tensor | int:
    """The key of sub-stream ``streams`` (non-negative ints, e.g. ``(0,)`` for the probes and
    ``(1,)`` for the PCA test matrix) of ``seed``: each level hashes the key and the stream's index.

    Eagerly the key is a Python int (the seed is a CPU tensor: reading it costs no device sync, and
    a dozen scalar tensor ops per layer call would cost more than the probes); in compiled code it
    is an int64 scalar tensor, the same bits."""
    if isinstance(seed, torch.Tensor) and torch.compiler.is_compiling():
        k = seed.to(torch.int64)
        for stream in streams:
            k = _finalize_(k + _int64((stream + 1) * _GAMMA))
        return k
    k = int(seed) & _MASK
    for stream in streams:
        k = _finalize_int((k + (stream + 1) * _GAMMA) & _MASK)
    return _int64(k)


def random_bits(k: torch.Tensor | int, count: int, device) -> torch.Tensor:
    """``int64 [count]``, 64 independent uniform bits each: entries ``0 .. count-1`` of stream ``k``."""
    # The state is (i xor k) * gamma, not splitmix's k + i * gamma: inductor (torch 2.14) folds an
    # arange's arithmetic with constants into index expressions, where 64-bit wrap-around is an
    # overflow error (or, for a bare arange times a large constant on the CPU, corrupt memory); a
    # xor is no index arithmetic. Keys are random (drawn seeds, or finalizer outputs), so two
    # streams' states coincide only where the keys agree in every bit above the count's.
    z = torch.arange(1, count + 1, dtype=torch.int64, device=device)
    z.bitwise_xor_(k if isinstance(k, int) else k.to(device)).mul_(_int64(_GAMMA))
    block = count if torch.compiler.is_compiling() else _BLOCK
    for start in range(0, count, block):
        _finalize_(z[start : start + block])
    return z


def uniform16(k: torch.Tensor | int, count: int, device) -> torch.Tensor:
    """``int16 [count]``, uniform over all 65536 values, four from each 64-bit hash."""
    return random_bits(k, -(-count // 4), device).view(torch.int16)[:count]


def _box_muller(bits: torch.Tensor, out: torch.Tensor) -> None:
    """Write the Box-Muller pairs of 64-bit hashes ``bits [m]`` into ``out [m, 2]`` (float32)."""
    unit = 2.0**-24
    # In float64, rounded to float32 once: eager and compiled code (other log/cos kernels, fused
    # multiply-adds) then differ in the last float64 bits only, which the rounding removes.
    u1 = (_shift_right(bits, 40).double() + 0.5) * unit  # in (0, 1): the log is finite
    u2 = ((bits >> 8) & ((1 << 24) - 1)).double() * unit
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    out[:, 0] = radius * torch.cos(angle)
    out[:, 1] = radius * torch.sin(angle)


def gaussian(k: torch.Tensor | int, shape, device) -> torch.Tensor:
    """Standard normal ``float32`` of ``shape`` by Box-Muller, a pair from each 64-bit hash
    (two 24-bit uniforms; the largest magnitude is ``sqrt(2 ln 2^25) = 5.9``)."""
    count = math.prod(shape)
    bits = random_bits(k, -(-count // 2), device)
    pairs = torch.empty(bits.shape[0], 2, dtype=torch.float32, device=device)
    block = bits.shape[0] if torch.compiler.is_compiling() else _BLOCK // 2  # float64 temporaries in cache
    for start in range(0, bits.shape[0], block):
        _box_muller(bits[start : start + block], pairs[start : start + block])
    return pairs.view(-1)[:count].view(shape)


def rademacher(k: torch.Tensor | int, shape, device) -> torch.Tensor:
    """``float32`` +-1 of ``shape``, equally likely, 64 from each 64-bit hash."""
    count = math.prod(shape)
    bits = random_bits(k, -(-count // 64), device)
    signs = (bits[:, None] >> torch.arange(64, device=device)) & 1
    return signs.view(-1)[:count].view(shape).float().mul_(2).sub_(1)
