"""Train one task with XConv layers: ``python run.py task=segmentation xconv.probes=8``.

Composes ``configs/``, builds the data module and the task from their ``_target_``s, converts
the task's network with ``xconv.convert``, trains and validates with Lightning, and writes
``summary.json`` (see ``experiments/summary.py``) next to the checkpoints and logs.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

import xconv
from experiments.config import (
    ConfigError, check_checkpoint, check_checkpoint_fits, check_launcher, check_run_config, checkpointing_patterns,
    exit_with, remove_created_output_dirs, remove_if_only, restore_earlier_hydra_files, xconv_options,
)
from experiments.summary import build_summary, git_commit, summary_callbacks, write_summary

log = logging.getLogger("run")

# Printed on every run, and nothing a user of run.py can act on: Lightning 2.6 still calls
# torch's deprecated LeafSpec, and every Trainer advertises Lightning's cloud services.
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not record.getMessage().startswith("💡 Tip:")
)


def _user_key(cfg: DictConfig, full_key: str) -> str:
    """The config key a user would write for node ``full_key``: ``task.net`` filled by ``${model}`` is ``model``."""
    parent_key, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    raw = OmegaConf.to_container(parent, resolve=False).get(leaf) if isinstance(parent, DictConfig) else None
    source = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
    return source[1] if source else full_key


def _build(cfg: DictConfig, key: str, **kwargs):
    """``instantiate(cfg[key])``; a constructor's complaint about an argument becomes a ConfigError.

    Constructors here start such messages with the argument name, so prefixing the config node
    gives the full key (``data.root: ...``). For an object built inside another (the model inside
    the task), Hydra names the failing node (``full_key: task.net``), and the key it was filled
    from (``${model}``) is the one the user sets: ``model.channels: ...``.
    """
    try:
        return instantiate(cfg[key], **kwargs)
    except InstantiationException as err:
        node = re.search(r"full_key: (\S+)", str(err))
        where = _user_key(cfg, node[1]) if node else key
        if isinstance(err.__cause__, (ValueError, TypeError, FileNotFoundError)):
            # Lightning's Trainer writes sentences ("Precision 'fp8' is invalid..."), not "<argument>: ...".
            separator = ": " if key == "trainer" else "."
            raise ConfigError(f"{where}{separator}{err.__cause__}") from err.__cause__
        if isinstance(err.__cause__, MisconfigurationException):  # Lightning's, e.g. trainer.max_epochs=-3
            raise ConfigError(f"{where}: {err.__cause__}") from err.__cause__
        if isinstance(err.__cause__, KeyError):  # e.g. smp's unknown encoder name
            raise ConfigError(f"{where}: {err.__cause__.args[0]}") from err.__cause__
        raise


@contextmanager
def _held_back(*names: str) -> Iterator[None]:
    """Hold back what the loggers ``names`` log in the block, and log it once the block ends without an error.

    A config error found after ``xconv.convert`` (a checkpoint that does not fit, ``checkpointing``
    patterns, ``xconv.budget``) is then the only line a refused run prints, not the last after
    "xconv.convert: N convs converted".
    """
    loggers, held = [logging.getLogger(name) for name in names], []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    for logger in loggers:
        logger.addFilter(hold)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hold)
    for record in held:  # not reached on an error: those records are dropped
        logging.getLogger(record.name).handle(record)


def build(cfg: DictConfig):
    """Data module, converted task and Trainer, built after ``seed_everything(cfg.seed)``, or a ConfigError
    before anything trains."""
    with _held_back("xconv.convert", "xconv.planner"):
        return _assemble(cfg)


def _assemble(cfg: DictConfig):
    check_run_config(cfg)
    ckpt_path = cfg.get("ckpt_path")
    checkpoint_shapes = check_checkpoint(ckpt_path) if ckpt_path is not None else None
    options = xconv_options(cfg)
    checkpointing = checkpointing_patterns(cfg)
    # Before anything random is built; quietly, so that a config error is the only line printed
    # (the seed is in the run's config and summary).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = _build(cfg, "data")
    task = _build(cfg, "task")
    try:
        task.check_data(datamodule)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    budget = options.pop("budget")
    try:
        xconv.convert(task.net, **options)
        if budget is not None:
            task.plan_storage(datamodule, budget)
    except ValueError as err:  # options are checked already; what is left names the network's modules or the budget
        raise ConfigError(f"xconv.{err}") from err
    if checkpointing is not None:  # after convert: segments may hold XConv layers, converted by exact class
        try:
            xconv.checkpoint_modules(task.net, checkpointing)
        except ValueError as err:  # "include: no module matches ..."
            raise ConfigError(f"checkpointing: {str(err).partition(': ')[2]}") from err
    if checkpoint_shapes is not None:  # the network as it is trained: converted, with its checkpointed segments
        check_checkpoint_fits(ckpt_path, checkpoint_shapes, task)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + summary_callbacks()
    trainer = _build(cfg, "trainer", logger=loggers or False, callbacks=callbacks)
    check_launcher(trainer, multirun=HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN, task=task)
    return datamodule, task, trainer


def run(cfg: DictConfig) -> dict | None:
    """Train, validate (and test, where the data has a test split) and write ``summary.json``.

    The summary goes into ``cfg.output_dir`` and is returned. Validation and test score the
    final weights; ``metrics`` holds both (``val/...``, ``test/...``), and none of a stage that
    runs no batch (``trainer.limit_val_batches=0``: the summary's ``metric`` is then None). In
    a distributed run every process trains, validates and tests on its share of the data
    (torchmetrics scores are computed over all ranks), and only global rank 0 writes and logs
    the summary; the other ranks return None.
    """
    commit = git_commit()  # the code that runs is the code checked out now
    datamodule, task, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    # Lightning returns no result where it runs no batch (trainer.limit_val_batches=0): no metrics then.
    metrics = next(iter(trainer.validate(task, datamodule=datamodule, verbose=False)), {})
    if has_test_stage(task, datamodule):
        metrics |= next(iter(trainer.test(task, datamodule=datamodule, verbose=False)), {})
    if not trainer.is_global_zero:
        return None
    summary = build_summary(cfg, trainer, task, datamodule, metrics, commit)
    path = write_summary(summary, Path(cfg.output_dir) / "summary.json")
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in trainer.loggers:
        logger.log_metrics({f"summary/{k}": v for k, v in scalars.items()}, step=trainer.global_step)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # a later run in this process (multirun) must not reuse this one
    log.info("%s = %s; activation bytes %d (exact %d); summary: %s", summary["metric_name"],
             summary["metric"], summary["activation_bytes"], summary["activation_bytes_exact"], path)
    return summary


def has_test_stage(task: L.LightningModule, datamodule: L.LightningDataModule) -> bool:
    """Whether the data has a held-out test split (a ``test_set``, after setup) and the task scores it."""
    return is_overridden("test_step", task) and getattr(datamodule, "test_set", None) is not None


def remove_unused_run_dir(run_dir: Path, job_name: str) -> None:
    """Delete ``run_dir`` if it holds only what Hydra writes at job start: ``.hydra/`` and ``<job_name>.log``."""
    remove_if_only(run_dir, {".hydra", f"{job_name}.log"})


def command_line_error(err: ConfigCompositionException | OverrideParseException) -> str:
    """One line for a command line that does not parse or compose, e.g. an unknown ``task=`` choice."""
    if isinstance(err, MissingConfigException) and err.options:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        return f"{group} must be one of {sorted(err.options)}, got {choice!r}"
    message = " ".join(str(err).split())
    return f"{err.override}: {message}" if isinstance(err, OverrideParseException) else message


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except ConfigError as err:
        hydra_cfg = HydraConfig.get()
        restore_earlier_hydra_files()  # a run resumed into its own directory: its record of the config
        # Nothing ran: nothing to keep. output_dir=... may point elsewhere than Hydra's run directory
        # (or not resolve: then the error is about it).
        output_dir = OmegaConf.select(cfg, "output_dir", throw_on_resolution_failure=False)
        for run_dir in {hydra_cfg.runtime.output_dir, *([output_dir] if isinstance(output_dir, str) else [])}:
            remove_unused_run_dir(Path(run_dir), hydra_cfg.job.name)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the error ends the whole sweep: drop its directory if nothing ran
            remove_if_only(Path(hydra_cfg.sweep.dir), {"multirun.yaml"})
        remove_created_output_dirs()  # outputs/<task>/ and the like, where this run created them and they are empty
        exit_with(err)
    return summary["metric"] if summary is not None else None


if __name__ == "__main__":
    # Hydra reports a command line that does not parse or compose over many lines and exits with
    # 1; with HYDRA_FULL_ERROR it raises instead, so the error reads and exits like the others here
    # (other exceptions then show Python's full traceback instead of Hydra's shortened one).
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as err:
        exit_with(command_line_error(err))
