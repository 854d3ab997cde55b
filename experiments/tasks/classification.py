"""Image classification scored by top-1 accuracy."""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .base import XConvTask


class ClassificationTask(XConvTask):
    """Train ``net`` (images [B, C, H, W] -> logits [B, num_classes]) on integer labels [B].

    Loss: cross-entropy. Validation logs ``val/acc`` (top-1 accuracy over the whole split) and
    ``val/loss``; ``trainer.test`` logs the same as ``test/acc`` and ``test/loss``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> task = ClassificationTask(net, num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-3))
        >>> batch = torch.rand(2, 1, 8, 8), torch.tensor([3, 7])
        >>> task.loss(batch).shape
        torch.Size([])
    """

    metric_name = "val/acc"

    def __init__(self, net: nn.Module, num_classes: int, optimizer: partial, scheduler: partial | None = None,
                 metric: Mapping | None = None):
        super().__init__(net, optimizer, scheduler, metric)
        self.cross_entropy = nn.CrossEntropyLoss()
        # One metric per stage: Lightning computes and resets each at the end of its loop.
        self.accuracy = nn.ModuleDict(
            {stage: MulticlassAccuracy(num_classes, average="micro") for stage in ("val", "test")}
        )

    def loss(self, batch, net: nn.Module | None = None) -> torch.Tensor:
        images, labels = batch
        return self.cross_entropy((net or self.net)(images), labels)

    def _evaluate(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self.net(images)
        self.log(f"{stage}/loss", self.cross_entropy(logits, labels), sync_dist=True)  # the mean over all DDP ranks
        self.accuracy[stage].update(logits, labels)
        self.log(f"{stage}/acc", self.accuracy[stage], prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")
