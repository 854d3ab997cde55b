"""A test-only callback that records, per process, what a distributed or swept run cannot show in its summary.

Add it to a ``run.py`` command line with ``+callbacks.probe._target_=tests.run_probe.RunProbe``
(``tests`` must be importable there: run ``run.py`` with the repository root on ``PYTHONPATH``).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from xconv.rng import state_seed


class RunProbe(L.Callback):
    """Writes ``probe_rank<global rank>.pt`` into the run directory (``trainer.default_root_dir``).

    It holds ``torch_seed``, the seed torch's default generator was last seeded with, and
    ``probe_seed``, the probe seed an XConv forward would draw at its state when training starts
    (``xconv.rng.state_seed``: nothing is drawn, so the run is unchanged); ``params``, the
    rank's parameters after training; and ``wandb``, the id and group of the run's W&B run
    (rank 0 with a W&B logger only, else None).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.torch_seed = torch.initial_seed()
        self.probe_seed = state_seed(torch.get_rng_state(), 0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wandb = next((logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
        record = {
            "torch_seed": self.torch_seed,
            "probe_seed": self.probe_seed,
            "params": {name: p.detach().clone() for name, p in pl_module.named_parameters()},
            "wandb": {"id": wandb.id, "group": wandb.group} if wandb is not None and trainer.is_global_zero else None,
        }
        torch.save(record, Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.pt")
