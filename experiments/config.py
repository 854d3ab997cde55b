"""Run-configuration checks that must fail before any training starts."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# xconv.relu in the config -> the ``relu`` flag of ``xconv.convert``.
RELU_CHOICES = {"bit": True, "exact": False}


class ConfigError(ValueError):
    """A bad configuration value; the message names the config key and the allowed values."""


def check_run_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for a mandatory key (``???`` in a config) left unset or a missing checkpoint."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)} must be set, e.g. on the command line: {example}")
    if cfg.get("ckpt_path") is not None and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {cfg.ckpt_path!r}")


def xconv_options(cfg: DictConfig) -> dict:
    """Keyword arguments for ``xconv.convert`` from ``cfg.xconv``.

    Only ``relu`` is translated here (``bit`` -> 1-bit ReLU, ``exact`` -> torch ReLU); probes,
    mode, distribution and min_pixels are checked by ``xconv`` itself, which owns their
    allowed values.
    """
    options = OmegaConf.to_container(cfg.xconv, resolve=True)
    relu = options.get("relu", "bit")
    if relu not in RELU_CHOICES:
        raise ConfigError(f"xconv.relu must be one of {sorted(RELU_CHOICES)}, got {relu!r}")
    options["relu"] = RELU_CHOICES[relu]
    return options
