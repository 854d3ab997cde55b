"""Probe generation for the XConv estimator.

Probes are regenerated in backward from a key (:mod:`xconv.rng`) instead of being stored, so
everything here is a pure function of ``(key, shape, distribution)``, except the
data-adaptive deflation basis (:func:`range_basis`), which the layer stores. Entries are
scaled so that ``E[Z Z^T] = I`` over the probed dimension.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

from . import rng

DISTRIBUTIONS = ("gaussian", "rademacher")


def random_probes(
    shape: tuple[int, ...],
    num_probes: int,
    distribution: str,
    key: torch.Tensor | int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Random probe entries of ``shape`` scaled by ``1/sqrt(num_probes)``.

    Args:
        shape: output shape; one of its axes indexes the ``num_probes`` probes.
        num_probes: total number of probes r, used for the scaling so that a sum over all
            r probes of ``z z^T`` has expectation ``I``.
        distribution: ``"gaussian"`` (N(0, 1)) or ``"rademacher"`` (+-1).
        key: the stream's key (:func:`xconv.rng.key`).
    Returns:
        Tensor of ``shape`` in ``dtype``. Drawn in float32 so the values do not depend on
        the compute dtype (bf16/fp16 runs see the same probes, rounded).
    """
    if distribution == "gaussian":
        z = rng.gaussian(key, shape, device)
    elif distribution == "rademacher":
        z = rng.rademacher(key, shape, device)
    else:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return z.mul_(1.0 / math.sqrt(num_probes)).to(dtype)


def orthogonal_probes(
    channels: int,
    pixels: int,
    chunk_probes: int,
    num_probes: int,
    key: torch.Tensor | int,
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
    g = rng.gaussian(key, (channels, pixels, chunk_probes), device)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q = q.mul_(math.sqrt(pixels / num_probes))
    return q.permute(2, 0, 1).to(dtype)


# --------------------------------------------------------------------------- deflation
# Deflated probes (Hutch++-style; Meyer, Musco, Musco, Woodruff 2021): k orthonormal
# directions Q capture most of the activation's energy and are kept exactly; the remaining
# r - k random probes are projected onto the complement of Q, so the estimator stays unbiased
# (E[Q Q^T + (I - QQ^T) G G^T (I - QQ^T)] = I) and its variance comes from the residual only.

DEFLATIONS = ("dct", "pca")


def _dct_matrix(size: int) -> torch.Tensor:
    """Orthonormal DCT-II basis ``[size, size]``, row ``f`` the frequency-``f`` cosine."""
    f = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (i + 0.5) * f / size) * math.sqrt(2.0 / size)
    c[0] /= math.sqrt(2.0)
    return c


@functools.lru_cache(maxsize=64)
def dct_basis(spatial: tuple[int, ...], rank: int, device: torch.device) -> torch.Tensor:
    """The ``rank`` lowest-frequency separable DCT-II images, ``float32 [min(rank, n), n]``.

    Rows are orthonormal over the ``n = prod(spatial)`` pixels. Frequencies ``(f_1, ...)``
    are ranked by ``sum((f_d / N_d)^2)`` (ties by the tuple), so row 0 is the constant image
    (the per-channel mean, the largest part of a post-ReLU activation). Cached per shape.
    """
    # A frequency in the lowest `rank` never exceeds rank - 1 along any axis.
    candidates = itertools.product(*(range(min(size, rank)) for size in spatial))
    chosen = sorted(candidates, key=lambda f: (sum((a / s) ** 2 for a, s in zip(f, spatial)), f))[:rank]
    mats = [_dct_matrix(size) for size in spatial]
    rows = [functools.reduce(lambda u, v: torch.outer(u, v).flatten(), (m[a] for m, a in zip(mats, f))) for f in chosen]
    return torch.stack(rows).to(torch.float32).to(device)


def range_basis(x: torch.Tensor, rank: int, key: torch.Tensor | int) -> torch.Tensor:
    """Orthonormal basis ``float32 [min(rank, n), n]`` of the dominant pixel-space range of ``x``.

    Randomized range finder with one subspace iteration (Halko, Martinsson, Tropp 2011,
    alg. 4.3) on ``x`` viewed as a ``[B * C_in, n]`` matrix: ``Q = orth(M^T M M^T Omega)``.
    Costs ``3 * B * C_in * n * rank`` multiply-adds; never forms an ``n x n`` matrix.

    Args:
        x: ``[B, C_in, *S_in]`` layer input.
        key: the test matrix's stream (:func:`xconv.rng.key`).
    """
    m = x.detach().flatten(2).flatten(0, 1).float()
    rank = min(rank, m.shape[1])
    omega = rng.gaussian(key, (rank, m.shape[0]), x.device)
    y = omega @ m
    y = (y @ m.t()) @ m
    q, _ = torch.linalg.qr(y.t())
    return q.t().contiguous()


def deflated_probes(
    basis: torch.Tensor,
    lead: tuple[int, ...],
    num_probes: int,
    distribution: str,
    key: torch.Tensor | int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Probes ``[*lead, num_probes, n]``: the ``k`` basis rows, then ``num_probes - k`` random
    probes projected onto the basis's orthogonal complement and scaled by ``1/sqrt(r - k)``.

    Args:
        basis: ``[k, n]`` orthonormal rows, ``k < num_probes``.
        lead: leading shape of the random part (``(B,)`` for per-sample probes, else ``()``).
    """
    k, n = basis.shape
    g = random_probes(lead + (num_probes - k, n), num_probes - k, distribution, key, torch.float32, basis.device)
    g = g - (g @ basis.t()) @ basis
    return torch.cat([basis.expand(*lead, k, n), g], dim=-2).to(dtype)
