"""What ``run.py`` does around a run: quiet Lightning's notices, and end a refused run in one line,
leaving nothing behind."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from .config import CREATED_OUTPUT_DIRS, remove_created_output_dirs, remove_if_only, restore_earlier_hydra_files
from .errors import ConfigError, exit_with


def _no_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Drop what every run printed and no user of ``run.py`` can act on: Lightning 2.6 still calls
    torch's deprecated ``LeafSpec``, every Trainer advertises Lightning's cloud services, and step
    checkpoints of manually optimized tasks are warned about.
    Called once per run; repeated calls add nothing."""
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # A step checkpoint (callbacks.step_checkpoint) of the GAN's manually optimized task is saved after
    # its optimizer steps, which Lightning warns about; after the step is the state a resume must start from.
    warnings.filterwarnings("ignore", "Using ModelCheckpoint with manual optimization", UserWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tip)


def remove_unused_run_dir(run_dir: Path, job_name: str) -> None:
    """Delete ``run_dir`` if it holds only what Hydra writes at job start: ``.hydra/`` and ``<job_name>.log``."""
    remove_if_only(run_dir, {".hydra", f"{job_name}.log"})


@contextmanager
def refused_runs_end_in_one_line(cfg: DictConfig) -> Iterator[None]:
    """Turn a :class:`ConfigError` raised in the block into ``error: <message>`` and exit status 2, after
    undoing what the refused run left: Hydra's run directory (and sweep directory) where nothing ran,
    the directories created for it, and the earlier ``.hydra/`` files of a run resumed into its directory."""
    try:
        yield
    except ConfigError as err:
        hydra_cfg = HydraConfig.get()
        restore_earlier_hydra_files()
        # output_dir=... may point elsewhere than Hydra's run directory (or not resolve: then the error is about it).
        output_dir = OmegaConf.select(cfg, "output_dir", throw_on_resolution_failure=False)
        for run_dir in {hydra_cfg.runtime.output_dir, *([output_dir] if isinstance(output_dir, str) else [])}:
            remove_unused_run_dir(Path(run_dir), hydra_cfg.job.name)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the error ends the whole sweep: drop its directory if nothing ran
            remove_if_only(Path(hydra_cfg.sweep.dir), {"multirun.yaml"})
        remove_created_output_dirs()  # outputs/<task>/ and the like, where this run created them and they are empty
        exit_with(err)


def remove_refused_sweep_dir() -> None:
    """After a sweep whose jobs do not compose (``-m xconv.mode=independent,bogus``: Hydra's sweeper
    composes every job before the launcher starts), delete the sweep directory and parents that
    :class:`~experiments.config.MakeOutputDir` created, where they hold nothing but ``multirun.yaml``."""
    for directory in reversed(CREATED_OUTPUT_DIRS):
        remove_if_only(directory, {"multirun.yaml"})


def command_line_error(err: ConfigCompositionException | OverrideParseException) -> str:
    """One line for a command line that does not parse or compose, e.g. an unknown ``task=`` choice, or
    a value a structured config's schema refuses (``xconv.mode=bogus``: OmegaConf's message, with its key)."""
    if isinstance(err, MissingConfigException) and err.options:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        return f"{group} must be one of {sorted(err.options)}, got {choice!r}"
    cause = err.__cause__
    if isinstance(cause, ValidationError) and cause.full_key:  # Hydra's own line says only "Error merging override"
        return f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    message = " ".join(str(err).split())
    return f"{err.override}: {message}" if isinstance(err, OverrideParseException) else message
