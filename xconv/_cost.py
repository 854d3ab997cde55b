"""The cost model: which kernel and contraction order a layer uses, and its measured constants.

Every measured constant of the estimator is here. Each was measured on CPU (2 cores, torch
2.14.1); the runs are described in ``results/bench/README.md`` (runs G and H) with their raw output
in ``results/bench/run_g/`` and ``results/bench/run_h/``. Change one only with a new measurement there.
"""
from __future__ import annotations

import math

from ._geometry import ConvGeometry
from ._options import SketchConfig

# Smallest map on which the CPU input gradient runs as a conv with the flipped kernel. Measured
# (2 cores, torch 2.14.1, 3x3, 8 rounds): flip / transposed conv 0.91x at 64ch 32x32 batch 64,
# 0.81-0.84x at 64x64 and 128ch 32x32 batch 8, 0.90x at 32ch 128x128; 0.97-1.02x at 16x16,
# 0.97x at 256ch 8x8 and 1.16x at 512ch 8x8 (run G). Used by :func:`xconv._kernels.input_grad`.
FLIP_MIN_PIXELS = 32 * 32

# What one block of the probes order costs beyond its multiply-adds, in multiply-adds: on CPU
# (2 cores, torch 2.14.1, r=8, batch 64) 18 blocks of 128 channels at 4x4 took ~3 ms more than
# their arithmetic, ~170 us a block, and GEMMs of these shapes run at 50-70 G multiply-adds/s (run H).
BLOCK_COST = 2**23


def probe_blocks(cfg: SketchConfig, batch: int, pixels: int, c_out: int, taps: int) -> tuple[int, int]:
    """``(samples, taps)`` per block of ``A [B, C_out, r, |K|]`` that the probes order builds at
    once, keeping each block below a quarter of ``D [B, C_out, pixels]``: the whole batch and as
    many taps as fit, or, where one tap of the whole batch does not fit (``pixels < 4r``), one tap
    and as many samples as fit (at least one). A tap block keeps the sketch contraction's inner
    dimension at ``B*r``; a sample block shrinks it. Per-sample probes' taps
    (``[samples, r, |K|, pixels]``) are kept below a quarter of D too."""
    r = cfg.probes
    fit = batch * pixels // (4 * r)  # samples x taps
    samples, tap_block = (batch, min(taps, fit // batch)) if fit >= batch else (max(1, fit), 1)
    if cfg.per_sample:
        samples = min(samples, max(1, batch * c_out // (4 * r * taps)))
    return samples, tap_block


def choose_contraction(cfg: SketchConfig, x_shape, y_shape, weight_shape, geom: ConvGeometry) -> str:
    """Pick the contraction order for independent mode: the one with the lower cost.

    ``"probes"`` costs ``B*C_out*r*|K|*(P + C_in/g)`` multiply-adds, where ``P`` is the number
    of output pixels (those of ``D``), plus :data:`BLOCK_COST` for each block of ``A``
    (:func:`probe_blocks`): on small maps ``A`` outgrows the upstream gradient and is built in
    many small blocks. ``"decompress"`` costs ``B*C_in*n*r`` plus the exact weight gradient
    ``B*C_out*(C_in/g)*|K|*p``, where ``p`` is the number of pixels that one sums over (output
    pixels of a conv, input pixels of a transposed conv). Measured per layer (forward +
    backward, batch 64, r=8, XConv / exact, probes vs decompress): 512 channels at 4x4
    0.83-0.84x vs 0.95-0.99x, 128 channels at 4x4 1.31-1.36x vs 1.10-1.14x, 64 at 8x8
    0.90-0.94x vs 0.99-1.13x; ``results/bench/README.md``, run H.
    """
    if cfg.contraction != "auto":
        return cfg.contraction
    batch, c_in, n = x_shape[0], x_shape[1], math.prod(x_shape[2:])
    c_out = y_shape[1]
    taps = math.prod(weight_shape[2:])
    out_pixels = math.prod(y_shape[2:])
    p = n if geom.transposed else out_pixels
    samples, tap_block = probe_blocks(cfg, batch, out_pixels, c_out, taps)
    blocks = -(-batch // samples) * -(-taps // tap_block)
    c_in_g = c_in // geom.groups
    probes_cost = batch * c_out * cfg.probes * taps * (out_pixels + c_in_g) + blocks * BLOCK_COST
    decompress_cost = batch * c_in * n * cfg.probes + batch * c_out * c_in_g * taps * p
    return "probes" if probes_cost <= decompress_cost else "decompress"
