"""scikit-learn's handwritten digits as an offline image-classification set (nothing downloaded)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from .base import ClassificationDataModule


class DigitsDataModule(ClassificationDataModule):
    """``load_digits``: 1797 real 8x8 scans of digits 0-9 written by 43 people, upscaled to ``image_size``.

    The split into train, validation (``val_fraction``) and test (``test_fraction``) is
    stratified by digit and a function of ``seed``. Scans (values 0..16) are scaled to [0, 1]
    and resized with bilinear interpolation. Batches are ``(images, labels)``: images float32
    [B, 1, image_size, image_size] in [0, 1], labels int64 [B] in 0..9.

    Example:
        >>> dm = DigitsDataModule(image_size=16, batch_size=4)
        >>> dm.setup("fit")
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), tuple(labels.shape)
        ((4, 1, 16, 16), (4,))
    """

    NUM_CLASSES = 10
    IN_CHANNELS = 1

    def __init__(
        self,
        image_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        num_classes: int | None = None,
        in_channels: int | None = None,
    ):
        super().__init__(batch_size, num_workers, num_classes, in_channels)
        if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction, test_fraction: need both > 0 and a sum < 1, got {val_fraction} and {test_fraction}"
            )
        self.image_size, self.seed = image_size, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        source = load_digits()
        images = torch.from_numpy(source.images).float().div_(16).unsqueeze(1)
        images = F.interpolate(images, size=self.image_size, mode="bilinear", antialias=True).clamp_(0, 1)
        labels = torch.from_numpy(source.target).long()
        rest, test = train_test_split(
            np.arange(len(labels)), test_size=self.test_fraction, stratify=source.target, random_state=self.seed
        )
        train, val = train_test_split(
            rest, test_size=self.val_fraction / (1 - self.test_fraction), stratify=source.target[rest],
            random_state=self.seed,
        )
        # Which load_digits samples each split holds (disjoint), kept for inspection.
        self.indices = {"train": train, "val": val, "test": test}
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(images[i], labels[i]) for i in (train, val, test)
        )
