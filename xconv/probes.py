"""Probe generation for the XConv estimator.

Probes are regenerated in backward from an integer seed instead of being stored, so
everything here is a pure function of ``(seed, shape, distribution)``. Entries are scaled
so that ``E[Z Z^T] = I`` over the probed dimension.
"""
from __future__ import annotations

import math

import torch

DISTRIBUTIONS = ("gaussian", "rademacher")


def draw_seed() -> int:
    """Draw a probe seed from torch's default CPU generator.

    Consuming the default generator (as dropout does) makes ``torch.manual_seed`` and
    Lightning's ``seed_everything`` reproduce the probes, without ever reseeding or
    restoring the global RNG state.
    """
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A private generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def random_probes(
    shape: tuple[int, ...],
    num_probes: int,
    distribution: str,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Random probe entries of ``shape`` scaled by ``1/sqrt(num_probes)``.

    Args:
        shape: output shape; one of its axes indexes the ``num_probes`` probes.
        num_probes: total number of probes r, used for the scaling so that a sum over all
            r probes of ``z z^T`` has expectation ``I``.
        distribution: ``"gaussian"`` (N(0, 1)) or ``"rademacher"`` (+-1).
    Returns:
        Tensor of ``shape`` in ``dtype``. Drawn in float32 so the values do not depend on
        the compute dtype (bf16/fp16 runs see the same probes, rounded).
    """
    if distribution == "gaussian":
        z = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    elif distribution == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=device, dtype=torch.int8)
        z = z.to(torch.float32).mul_(2).sub_(1)
    else:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return z.mul_(1.0 / math.sqrt(num_probes)).to(dtype)


def orthogonal_probes(
    channels: int,
    pixels: int,
    chunk_probes: int,
    num_probes: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Per-channel Haar-orthonormal probe blocks, shape ``[chunk_probes, channels, pixels]``.

    For each channel the ``chunk_probes`` columns over the ``pixels`` axis are orthonormal
    (QR of a Gaussian matrix with the sign of ``diag(R)`` fixed, which makes ``Q`` Haar
    distributed), scaled by ``sqrt(pixels / num_probes)``. Since ``E[Q Q^T] = (m/n) I`` for
    an ``n x m`` Haar block, the blocks of all chunks sum to ``E[Z Z^T] = I``; channels are
    independent, so cross-channel blocks have zero mean. Concatenated over channels the
    probe columns are exactly orthogonal (the paper's "orthogonal" multi-channel mode).

    Raises:
        ValueError: if ``chunk_probes > pixels`` (an n-dim space holds at most n
            orthonormal vectors).
    """
    if chunk_probes > pixels:
        raise ValueError(f"orthogonal probes need chunk_probes <= pixels, got {chunk_probes} > {pixels}")
    g = torch.randn((channels, pixels, chunk_probes), generator=generator, device=device, dtype=torch.float32)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q = q.mul_(math.sqrt(pixels / num_probes))
    return q.permute(2, 0, 1).to(dtype)
