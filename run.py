"""Train one task with XConv layers: ``python run.py task=segmentation xconv.probes=8``.

Composes ``configs/``, builds the data module, the task and the Trainer (``experiments/build.py``;
the Trainer's ``xconv.lightning.XConvCallback`` converts the task's network), trains, validates and
tests the final weights; the ``RunSummary`` callback writes ``summary.json`` (``experiments/summary.py``)
next to the checkpoints and logs.
"""
from __future__ import annotations

import logging
import os

import hydra
from hydra.errors import ConfigCompositionException, OverrideParseException
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from experiments.build import build, has_test_stage
from experiments.cli import command_line_error, quiet_lightning, refused_runs_end_in_one_line, remove_refused_sweep_dir
from experiments.errors import exit_with
from experiments.registry import register
from experiments.summary import RunSummary

log = logging.getLogger("run")


def run(cfg: DictConfig) -> dict | None:
    """Train, validate (and test, where the data has a test split); return the run summary.

    Validation and test score the final weights; the summary's ``metrics`` hold both (``val/...``,
    ``test/...``), and none of a stage that runs no batch (``trainer.limit_val_batches=0``: its
    ``metric`` is then None). In a distributed run every process trains and scores its share of the
    data (torchmetrics scores are computed over all ranks); global rank 0 writes the summary and
    returns it, the other ranks return None.
    """
    datamodule, task, trainer = build(cfg)
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    trainer.validate(task, datamodule=datamodule, verbose=False)
    if has_test_stage(task, datamodule):
        trainer.test(task, datamodule=datamodule, verbose=False)
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # a later run in this process (multirun) must not reuse this one
    written = next(cb for cb in trainer.callbacks if isinstance(cb, RunSummary))
    if (summary := written.summary) is not None:
        log.info("%s = %s; activation bytes %d (exact %s); summary: %s", summary["metric_name"], summary["metric"],
                 summary["activation_bytes"], summary["activation_bytes_exact"], written.path)
    return summary


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    quiet_lightning()
    with refused_runs_end_in_one_line(cfg):
        summary = run(cfg)
    return summary["metric"] if summary is not None else None


if __name__ == "__main__":
    # Hydra reports a command line that does not parse or compose over many lines and exits with
    # 1; with HYDRA_FULL_ERROR it raises instead, so the error reads and exits like the others here
    # (other exceptions then show Python's full traceback instead of Hydra's shortened one).
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    register()
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as err:
        remove_refused_sweep_dir()
        exit_with(command_line_error(err))
