"""Probes and the sketch ``S = Z^T X`` that forward keeps (paper section 3).

Probes are never stored: each is regenerated in backward from the layer call's seed
(:mod:`xconv.rng`), block by block in a fixed order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rng
from ._options import SketchConfig
from .probes import dct_basis, deflated_probes, orthogonal_probes, random_probes, range_basis

# Largest probe block (elements) materialised at once by the multi-channel modes, so the
# probes never outgrow the activation they replace (the reference code built them whole).
CHUNK_ELEMENTS = 2**22

# Sub-streams of a layer call's seed (xconv.rng.key): each random quantity has its own.
PROBE_STREAM, BASIS_STREAM, SKETCH_BITS_STREAM = 0, 1, 2


def deflation_basis(x: torch.Tensor, cfg: SketchConfig, seed: torch.Tensor) -> torch.Tensor | None:
    """The directions deflation keeps exactly, ``float32 [k, n]``, or None without deflation.

    ``"pca"`` draws its test matrix from the seed's own stream, independent of the probes'.
    """
    if cfg.deflation is None:
        return None
    if cfg.deflation == "dct":
        return dct_basis(tuple(x.shape[2:]), cfg.rank, x.device)
    return range_basis(x, cfg.rank, rng.key(seed, BASIS_STREAM))


def independent_probes(cfg: SketchConfig, seed: torch.Tensor, batch: int, spatial, dtype, device, basis=None):
    """Probes ``[r, *S_in]`` shared by the batch, or ``[B, r, *S_in]`` when per-sample.

    With a deflation ``basis`` (``[k, n]``) the first ``k`` probes are its rows.
    """
    key = rng.key(seed, PROBE_STREAM)
    lead = (batch,) if cfg.per_sample else ()
    if basis is None:
        return random_probes(lead + (cfg.probes, *spatial), cfg.probes, cfg.distribution, key, dtype, device)
    z = deflated_probes(basis, lead, cfg.probes, cfg.distribution, key, dtype)
    return z.view(*lead, cfg.probes, *spatial)


@dataclass(frozen=True)
class ChunkPlan:
    """How the multi-channel probe matrix ``[r, C_in, *S_in]`` is cut into blocks.

    ``unit`` is the channel granularity: 1 without groups, ``C_in/groups`` with groups (a
    block must hold whole groups so one grouped weight-gradient call serves it).
    """

    probes: int
    channels: int
    pixels: int
    unit: int
    probe_chunk: int
    channel_chunk: int

    @staticmethod
    def make(cfg: SketchConfig, channels: int, pixels: int, groups: int, out_numel: int):
        unit = 1 if groups == 1 else channels // groups
        m = min(cfg.probes, max(1, CHUNK_ELEMENTS // max(pixels * unit, out_numel)))
        if cfg.mode == "orthogonal":
            m = min(m, pixels)
        c = unit * max(1, min(channels // unit, CHUNK_ELEMENTS // (m * pixels * unit)))
        return ChunkPlan(cfg.probes, channels, pixels, unit, m, c)

    def blocks(self, cfg: SketchConfig, seed: torch.Tensor, spatial, dtype, device):
        """Yield ``(p0, p1, c0, c1, Z_block [p1-p0, c1-c0, *S_in])`` in a fixed order.

        Block ``i`` of the order draws from its own stream of ``seed``, so backward regenerates
        exactly the forward probes without storing them.
        """
        blocks = 0
        for p0 in range(0, self.probes, self.probe_chunk):
            p1 = min(self.probes, p0 + self.probe_chunk)
            for c0 in range(0, self.channels, self.channel_chunk):
                c1 = min(self.channels, c0 + self.channel_chunk)
                key = rng.key(seed, PROBE_STREAM, blocks)
                blocks += 1
                if cfg.mode == "orthogonal":
                    z = orthogonal_probes(c1 - c0, self.pixels, p1 - p0, self.probes, key, dtype, device)
                else:
                    z = random_probes((p1 - p0, c1 - c0, self.pixels), self.probes, cfg.distribution, key, dtype, device)
                yield p0, p1, c0, c1, z.view(p1 - p0, c1 - c0, *spatial)


# --------------------------------------------------------------------------- sketch


def sketch_input(x: torch.Tensor, cfg: SketchConfig, seed: torch.Tensor, plan: ChunkPlan | None, basis=None) -> torch.Tensor:
    """Sketch ``S = Z^T X`` of the layer input.

    Args:
        x: ``[B, C_in, *S_in]``.
        basis: deflation basis ``[k, n]`` from :func:`deflation_basis`, or None.
    Returns:
        ``[B, C_in, r]`` (independent) or ``[B, r]`` (multi / orthogonal), in ``x.dtype``.
    """
    batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    if cfg.mode == "independent":
        z = independent_probes(cfg, seed, batch, spatial, x.dtype, x.device, basis).flatten(-len(spatial))
        if not cfg.per_sample:
            z = z.expand(batch, *z.shape)
        # Z^T X computed as [B, r, C_in] with the pixels as the rows of the right operand, which reads a
        # channels_last input (what inductor's layout optimisation makes conv inputs on CPU) contiguously
        # and a contiguous one as a transposed operand; X [B C_in, n] as the left operand would need a
        # transposed copy of a channels_last input (results/bench/README.md, "torch.compile").
        return torch.bmm(z, x.flatten(2).transpose(1, 2)).transpose(1, 2)
    sketch = x.new_zeros(batch, cfg.probes)
    for p0, p1, c0, c1, z in plan.blocks(cfg, seed, spatial, x.dtype, x.device):
        sketch[:, p0:p1] += x[:, c0:c1].flatten(1) @ z.flatten(1).t()
    return sketch
