"""Semantic segmentation: per-pixel classification scored by IoU and Dice."""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.segmentation import DiceScore

from .base import XConvTask


class SegmentationTask(XConvTask):
    """Train ``net`` (images [B, C, H, W] -> logits [B, num_classes, H, W]) on integer masks [B, H, W].

    Loss: cross-entropy + multiclass Dice (smp). Validation logs, over the whole split (one
    confusion matrix, not a per-image average): ``val/mIoU`` (macro mean IoU over all classes,
    background included), ``val/dice`` (macro Dice), ``val/loss``, and per class
    ``val/IoU/<class name>`` and ``val/dice/<class name>``. ``trainer.test`` logs the same under
    ``test/`` for data sets with a test split.

    Example:
        >>> net = smp.Unet("resnet18", encoder_weights=None, classes=3)
        >>> task = SegmentationTask(net, num_classes=3, optimizer=partial(torch.optim.Adam, lr=1e-3))
        >>> batch = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
        >>> task.loss(batch).shape
        torch.Size([])
    """

    metric_name = "val/mIoU"

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: partial,
        class_names: list[str] | None = None,
        scheduler: partial | None = None,
        metric: Mapping | None = None,
    ):
        super().__init__(net, optimizer, scheduler, metric)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        self.cross_entropy = nn.CrossEntropyLoss()
        self.dice_loss = smp.losses.DiceLoss(smp.losses.MULTICLASS_MODE)
        dice = partial(DiceScore, num_classes, aggregation_level="global", input_format="index")
        # One set of metrics per stage: Lightning runs validation inside fit, test after it.
        self.mean_scores = nn.ModuleDict({
            stage: MetricCollection(
                {"mIoU": MulticlassJaccardIndex(num_classes, average="macro"), "dice": dice(average="macro")},
                prefix=f"{stage}/",
            )
            for stage in ("val", "test")
        })
        self.class_scores = nn.ModuleDict({
            stage: MetricCollection(
                {"IoU": MulticlassJaccardIndex(num_classes, average="none"), "dice": dice(average="none")}
            )
            for stage in ("val", "test")
        })

    def criterion(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(logits, masks) + self.dice_loss(logits, masks)

    def loss(self, batch, net: nn.Module | None = None) -> torch.Tensor:
        images, masks = batch
        return self.criterion((net or self.net)(images), masks)

    def _evaluate(self, batch, stage: str) -> None:
        images, masks = batch
        logits = self.net(images)
        self.log(f"{stage}/loss", self.criterion(logits, masks), sync_dist=True)  # the mean over all DDP ranks
        preds = logits.argmax(dim=1)
        self.mean_scores[stage].update(preds, masks)
        self.class_scores[stage].update(preds, masks)

    def _log_scores(self, stage: str) -> None:
        self.log_dict(self.mean_scores[stage].compute(), prog_bar=True)
        for metric, values in self.class_scores[stage].compute().items():
            self.log_dict({f"{stage}/{metric}/{name}": v for name, v in zip(self.class_names, values)})
        self.mean_scores[stage].reset()
        self.class_scores[stage].reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")
