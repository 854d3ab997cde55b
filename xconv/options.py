"""One typed, self-validating object for every option of :func:`xconv.convert`.

:class:`ConvertOptions` is what a user writes in Python (``ConvertOptions(probes=8)``), what
``configs/xconv/`` holds (the same dataclass is the Hydra schema of that group: OmegaConf checks
types and the enumerated choices when the config is composed) and what the layers receive
(:attr:`ConvertOptions.sketch`, a :class:`~xconv.SketchConfig`). The choice-valued fields are
typed with the enums below, so a schema rejects a bad choice naming the key; on construction
they become plain strings, the one vocabulary of config, API and ``summary.json``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

from ._options import CONTRACTIONS, MODE_ALIASES, MODES, SKETCH_FIELDS, STORAGES, SketchConfig, check_min_pixels
from .probes import DEFLATIONS, DISTRIBUTIONS
from .quantize import check_bits

Mode = StrEnum("Mode", {**{m: m for m in MODES}, **MODE_ALIASES})
Distribution = StrEnum("Distribution", {d: d for d in DISTRIBUTIONS})
Contraction = StrEnum("Contraction", {c: c for c in CONTRACTIONS})
Deflation = StrEnum("Deflation", {d: d for d in DEFLATIONS})
Storage = StrEnum("Storage", {s: s for s in STORAGES})
# bit: nn.ReLU / nn.LeakyReLU become BitReLU / BitLeakyReLU (a 1-bit mask for backward); exact: torch's stay.
Relu = StrEnum("Relu", {"bit": "bit", "exact": "exact"})

_CHOICES = {"mode": Mode, "distribution": Distribution, "contraction": Contraction, "deflation": Deflation,
            "storage": Storage, "relu": Relu}


def _choice(name: str, value, enum: type[StrEnum]) -> str:
    """``value`` as the plain string of its ``enum`` member (an alias by its name: ``"gaussian"`` -> ``"multi"``)."""
    if isinstance(value, str) and value in enum.__members__:
        return str(enum[value])
    allowed = tuple(enum.__members__)
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _patterns(name: str, value) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name} must be None, a module-name pattern or a list of them (fnmatch), got {value!r}")
    return patterns


@dataclass
class ConvertOptions:
    """Every option of :func:`xconv.convert`, validated on construction (and by :func:`dataclasses.replace`).

    Attributes:
        probes, mode, distribution, per_sample, contraction, deflation, deflation_rank, storage,
            bits, max_compression: the estimator's options, see :class:`xconv.SketchConfig`
            (``mode="gaussian"`` is an alias of ``"multi"``).
        min_pixels: convs whose input has fewer pixels run exactly; ``None``: where a sketch would
            not be smaller than the input (see :class:`xconv.XConv2d`).
        relu: ``"bit"``: ``nn.ReLU``/``nn.LeakyReLU`` become :class:`xconv.BitReLU`/:class:`xconv.BitLeakyReLU`
            (exact in value and gradient, a 1-bit mask for backward); ``"exact"``: torch's stay.
        include, exclude: ``fnmatch`` patterns of module names to convert / keep exact (one pattern
            or a list); ``None``: every module / none.
        batchnorm_bits: BatchNorms keep their input in SR storage at these bits (2, 4, 8, 16);
            ``None``: torch's BatchNorm.
        maxpool: max-pools keep the argmax's window offset instead of input and int64 indices.

    Raises:
        TypeError, ValueError: on construction, naming the field and the allowed values (those of
            :class:`xconv.SketchConfig` for the estimator's fields).
    """

    probes: int = 8
    mode: Mode = Mode.independent
    distribution: Distribution = Distribution.gaussian
    per_sample: bool = False
    contraction: Contraction = Contraction.auto
    deflation: Deflation | None = None
    deflation_rank: int | None = None
    storage: Storage = Storage.sketch
    bits: int | None = None
    max_compression: int | None = None
    min_pixels: int | None = None
    relu: Relu = Relu.bit
    include: list[str] | None = None
    exclude: list[str] | None = None
    batchnorm_bits: int | None = None
    maxpool: bool = False

    def __post_init__(self):
        for name, enum in _CHOICES.items():
            if (value := getattr(self, name)) is not None or name != "deflation":  # the one that may be None
                setattr(self, name, _choice(name, value, enum))
        self.include, self.exclude = _patterns("include", self.include), _patterns("exclude", self.exclude)
        self.sketch  # noqa: B018 - builds the SketchConfig, which checks the estimator's options
        check_min_pixels(self.min_pixels)
        check_bits("batchnorm_bits", self.batchnorm_bits)
        if not isinstance(self.maxpool, bool):
            raise TypeError(f"maxpool must be a bool, got {self.maxpool!r}")

    @property
    def sketch(self) -> SketchConfig:
        """The estimator's options, as each converted conv layer holds them."""
        return SketchConfig(**{name: getattr(self, name) for name in SKETCH_FIELDS})

    def to_dict(self) -> dict:
        """The options as plain data (JSON-ready; ``ConvertOptions(**d)`` rebuilds them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ConvertOptions)}


def merged_options(options: ConvertOptions | None, overrides: dict) -> ConvertOptions:
    """``options`` (``None``: the defaults) with the fields named in ``overrides`` replaced, checked.

    Raises:
        TypeError: ``options`` is not a :class:`ConvertOptions`, or ``overrides`` names no field of it
            (the message lists the fields); TypeError, ValueError: what :class:`ConvertOptions` raises.
    """
    if options is not None and not isinstance(options, ConvertOptions):
        raise TypeError(f"options must be a ConvertOptions or None, got {options!r} (options by name: probes=8, ...)")
    fields = [f.name for f in dataclasses.fields(ConvertOptions)]
    if unknown := sorted(set(overrides) - set(fields)):
        raise TypeError(f"{unknown[0]}: no such option; the options of xconv.convert: {', '.join(fields)}")
    return dataclasses.replace(options or ConvertOptions(), **overrides)
