"""What ``run.py`` and the run summary need from every task."""
from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import nn


class XConvTask(L.LightningModule):
    """A LightningModule whose network ``net`` is the module ``run.py`` converts with ``xconv.convert``.

    Subclasses set :attr:`metric_name` (a key they log during validation, the run's headline
    number) and implement :meth:`loss`. ``optimizer`` is a partially-applied optimizer
    constructor (Hydra's ``_partial_: true``) that receives the parameters; ``scheduler``, if
    given, a partially-applied ``torch.optim.lr_scheduler`` class that receives the optimizer and
    steps once per epoch (e.g. ``CosineAnnealingLR`` with ``T_max`` = the number of epochs).
    """

    metric_name: str

    def __init__(self, net: nn.Module, optimizer: partial, scheduler: partial | None = None):
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def loss(self, batch, net: nn.Module | None = None) -> torch.Tensor:
        """The training loss of ``batch`` through ``net`` (default ``self.net``): one forward + loss.

        Taking the network as an argument lets the run summary measure the activation memory of
        the converted network and of a plain-torch copy on the same batch.
        """
        raise NotImplementedError

    def summary_metrics(self) -> dict:
        """Final metrics that ``self.log`` cannot carry (e.g. strings); the run summary adds them to its ``metrics``."""
        return {}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
