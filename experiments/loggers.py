"""Lightning loggers, adjusted where the pinned versions disagree."""
from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import loggers
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class WandbLogger(loggers.WandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous`` argument to ``wandb.init``.

    wandb 0.31 ignores ``anonymous`` and warns whenever it is passed; Lightning 2.6 always
    passes it (``None`` when unset), so every run printed the warning.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous")


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV ``ExperimentWriter`` that appends to an existing ``metrics.csv`` instead of deleting it.

    Lightning 2.6 deletes the file when its directory is reused, so a run resumed into its old
    run directory (``hydra.run.dir=<old run> ckpt_path=<old run>/checkpoints/last.ckpt``) lost
    every row logged before the checkpoint. Here the old rows stay and the new ones follow them:
    rows the interrupted run logged after its checkpoint's step stay too, so those steps appear
    twice, the resumed run's rows last. The old header is kept; new columns rewrite the file with
    the wider header (Lightning's own ``_rewrite_with_new_header``), old rows kept.
    """

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv; read its header instead
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            self.metrics_keys = next(csv.reader(file), [])
        if not self.metrics_keys:  # an empty file: nothing to keep, and appending would leave it without a header
            self._fs.rm_file(self.metrics_file_path)


class CSVLogger(loggers.CSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` keeps the rows of earlier runs in its directory
    (see :class:`AppendingExperimentWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
