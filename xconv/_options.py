"""The estimator's options (:class:`SketchConfig`) and their validation.

A :class:`SketchConfig` is checked where it is made, so every layer and every functional call
holds a valid one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .probes import DEFLATIONS, DISTRIBUTIONS
from .quantize import check_bits

MODES = ("independent", "multi", "orthogonal")
MODE_ALIASES = {"gaussian": "multi"}
CONTRACTIONS = ("auto", "probes", "decompress")
STORAGES = ("sketch", "quantized")


@dataclass(frozen=True)
class SketchConfig:
    """Options of the randomized weight-gradient estimator.

    Attributes:
        probes: number of probing vectors r (0: the exact gradient, the plain torch conv).
        mode: ``"independent"`` (sketch ``[B, C_in, r]``), ``"multi"`` (``[B, r]``) or
            ``"orthogonal"`` (``[B, r]``, per-channel orthonormal probe blocks).
        distribution: ``"gaussian"`` or ``"rademacher"`` probe entries (ignored by
            ``"orthogonal"``, which is Haar-orthonormal by construction).
        per_sample: independent mode only: draw separate probes for every sample, so the
            errors of different samples are independent instead of correlated.
        contraction: ``"probes"`` (contract ``D`` with the unfolded probes, then with the
            sketch), ``"decompress"`` (rebuild ``Z S`` and call the exact kernel) or
            ``"auto"`` (per layer, see :func:`xconv._cost.choose_contraction`).
        deflation: independent mode only: ``None`` (plain probes), ``"dct"`` (the lowest
            spatial frequencies are kept exactly) or ``"pca"`` (the batch's dominant pixel
            subspace, found in forward and stored, is kept exactly); the other probes are
            drawn in the complement. Same sketch size, still unbiased.
        deflation_rank: directions kept exactly (``< probes``); ``None``: 1 (with ``"dct"``
            the per-channel mean, which after a ReLU holds ~40% of the energy; measured
            best on U-Net layers, see ``results/bench/README.md``).
        storage: ``"sketch"`` (the paper's estimator, the options above) or ``"quantized"``
            (keep the input itself in SR low-bit storage, :mod:`xconv.quantize`; ``probes`` and
            the sketch options are unused).
        bits: bits per stored number (2, 4, 8 or 16; :data:`xconv.quantize.BITS`): the input's
            with ``"quantized"`` (required), the sketch's with ``"sketch"`` (``None``: the
            sketch in the input's dtype). Stochastic rounding keeps either unbiased.
        max_compression: sketch only: a cap on each layer's compression (input numbers per
            sketch number, ``H*W / r`` in independent mode); a layer on a larger map keeps
            more probes than ``probes``: ``r = max(probes, ceil(H*W / max_compression))``.
            ``None``: the fixed ``probes`` of the paper.
    """

    probes: int
    mode: str = "independent"
    distribution: str = "gaussian"
    per_sample: bool = False
    contraction: str = "auto"
    deflation: str | None = None
    deflation_rank: int | None = None
    storage: str = "sketch"
    bits: int | None = None
    max_compression: int | None = None

    def __post_init__(self):
        """Raises what :func:`validate_sketch_config` raises; the alias ``mode="gaussian"`` becomes ``"multi"``."""
        canonical = validate_sketch_config(
            self.probes, self.mode, self.distribution, self.per_sample, self.contraction, self.deflation,
            self.deflation_rank, self.storage, self.bits, self.max_compression,
        )
        if canonical != self.mode:
            object.__setattr__(self, "mode", canonical)

    @property
    def rank(self) -> int:
        """Directions kept exactly by deflation (0 without deflation)."""
        if self.deflation is None:
            return 0
        return 1 if self.deflation_rank is None else self.deflation_rank


# The option names of SketchConfig, which layers and xconv.convert also take one by one.
SKETCH_FIELDS = tuple(f.name for f in dataclasses.fields(SketchConfig))


def validate_sketch_config(
    probes,
    mode: str = "independent",
    distribution: str = "gaussian",
    per_sample: bool = False,
    contraction: str = "auto",
    deflation: str | None = None,
    deflation_rank: int | None = None,
    storage: str = "sketch",
    bits: int | None = None,
    max_compression: int | None = None,
) -> str:
    """Check estimator options; return the canonical mode name.

    Raises:
        TypeError: ``probes`` or ``deflation_rank`` is not an ``int`` (bools are rejected too).
        ValueError: ``probes < 0``, or ``mode``, ``distribution``, ``contraction`` or
            ``deflation`` is not one of the allowed values, or ``per_sample`` or
            ``deflation`` is combined with a multi-channel mode, or ``deflation_rank`` is
            given without ``deflation`` or not in ``1 .. probes - 1``, or ``storage`` is not
            allowed, ``bits`` is not in :data:`xconv.quantize.BITS` (or missing with
            ``"quantized"``), ``max_compression`` is not None or an int >= 1, or a sketch
            option is given with ``"quantized"``.
    """
    if isinstance(probes, bool) or not isinstance(probes, int):
        raise TypeError(f"probes must be an int >= 0 (0 = exact gradient), got {probes!r}")
    if probes < 0:
        raise ValueError(f"probes must be >= 0 (0 = exact gradient), got {probes}")
    canonical = MODE_ALIASES.get(mode, mode)
    if canonical not in MODES:
        allowed = MODES + tuple(MODE_ALIASES)
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if contraction not in CONTRACTIONS:
        raise ValueError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}")
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be a bool, got {per_sample!r}")
    if per_sample and canonical != "independent":
        raise ValueError(f"per_sample=True needs mode='independent', got mode={mode!r}")
    if deflation is not None:
        if deflation not in DEFLATIONS:
            raise ValueError(f"deflation must be None or one of {DEFLATIONS}, got {deflation!r}")
        if canonical != "independent":
            raise ValueError(f"deflation={deflation!r} needs mode='independent', got mode={mode!r}")
    if deflation_rank is not None:
        if deflation is None:
            raise ValueError(f"deflation_rank={deflation_rank!r} needs deflation='dct' or 'pca', got deflation=None")
        if isinstance(deflation_rank, bool) or not isinstance(deflation_rank, int):
            raise TypeError(f"deflation_rank must be None or an int, got {deflation_rank!r}")
        # At least one random probe must remain, or the estimate is a biased low-pass one.
        if deflation_rank < 1 or (probes > 0 and deflation_rank >= probes):
            raise ValueError(f"deflation_rank must be in 1 .. probes - 1 = {probes - 1}, got {deflation_rank}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    check_bits("bits", bits, none_ok=storage == "sketch")
    if max_compression is not None and (isinstance(max_compression, bool) or not isinstance(max_compression, int)
                                        or max_compression < 1):
        raise ValueError(f"max_compression must be None or an int >= 1, got {max_compression!r}")
    if storage == "quantized":
        sketch_only = dict(mode=canonical != "independent", per_sample=per_sample, deflation=deflation is not None,
                           max_compression=max_compression is not None)
        given = [name for name, set_ in sketch_only.items() if set_]
        if given:
            raise ValueError(f"{given[0]} is a sketch option; storage='quantized' keeps the input itself")
    return canonical


def check_min_pixels(min_pixels) -> None:
    """Raise ValueError unless ``min_pixels`` (the input size below which a layer runs exactly) is None or an int >= 0."""
    if min_pixels is not None and (isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0):
        raise ValueError(f"min_pixels must be None or an int >= 0, got {min_pixels!r}")


def sketch_numel_per_sample(cfg: SketchConfig, channels: int) -> int:
    """Numbers the sketch keeps per sample: ``C_in * r`` (independent) or ``r`` (multi)."""
    return channels * cfg.probes if cfg.mode == "independent" else cfg.probes


def layer_probes(cfg: SketchConfig, x_shape) -> int:
    """The probe count of a sketch of an input of ``x_shape``: ``probes``, raised by ``max_compression``."""
    if cfg.max_compression is None:
        return cfg.probes
    per_sketch_number = math.prod(x_shape[2:]) * (1 if cfg.mode == "independent" else x_shape[1])
    return max(cfg.probes, -(-per_sketch_number // cfg.max_compression))
