"""MNIST and CIFAR-10 (torchvision), downloaded into ``data_dir`` on first use."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import random_split
from torchvision.datasets import CIFAR10, MNIST, VisionDataset
from torchvision.transforms import v2

from ..errors import ConfigError
from .base import ClassificationDataModule


class TorchvisionClassificationDataModule(ClassificationDataModule):
    """A torchvision data set with an official train/test split, named by a subclass in ``dataset``.

    ``val_size`` images of the official training set, drawn at random from ``seed``, validate;
    the rest train; the official test set is the test split. Images are resized to
    ``image_size`` squares (None: kept at the data set's size). Batches are ``(images float32
    [B, C, H, W] in [0, 1], labels int64 [B])``.
    """

    dataset: type[VisionDataset]
    folder: str  # what ``dataset`` creates under data_dir

    def __init__(
        self,
        data_dir: str = "data/",
        download: bool = True,
        image_size: int | None = None,
        val_size: int = 5000,
        batch_size: int = 128,
        num_workers: int = 2,
        seed: int = 0,
        num_classes: int | None = None,
        in_channels: int | None = None,
    ):
        super().__init__(batch_size, num_workers, num_classes, in_channels)
        if not download and not (Path(data_dir) / self.folder).is_dir():
            raise FileNotFoundError(
                f"data_dir: no {self.folder} directory under {str(data_dir)!r}; set data.download=true to fetch it"
            )
        self.data_dir, self.download, self.val_size, self.seed = str(data_dir), download, val_size, seed
        resize = [v2.Resize([image_size, image_size])] if image_size is not None else []
        self.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *resize, v2.ToPureTensor()])

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            for train in (True, False):
                self.dataset(self.data_dir, train=train, download=True)
        except (OSError, RuntimeError) as err:  # offline: URLError, or MNIST's RuntimeError after all mirrors
            # A ConfigError, so run.py reports it in one line like a missing path, not as a traceback.
            reason = " ".join(str(err).split())
            raise ConfigError(
                f"data.data_dir: no {self.folder} under {self.data_dir!r} and downloading it failed ({reason}); "
                f"download it where the internet can be reached and copy it there"
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        official_train = self.dataset(self.data_dir, train=True, transform=self.transform)
        if not 0 < self.val_size < len(official_train):
            raise ValueError(f"val_size: must lie in (0, {len(official_train)}), got {self.val_size}")
        self.train_set, self.val_set = random_split(
            official_train, [len(official_train) - self.val_size, self.val_size],
            generator=torch.Generator().manual_seed(self.seed),
        )
        self.test_set = self.dataset(self.data_dir, train=False, transform=self.transform)


class MNISTDataModule(TorchvisionClassificationDataModule):
    """MNIST: 60 000 training and 10 000 test images of handwritten digits, 1x28x28, 10 classes."""

    dataset, folder = MNIST, "MNIST"
    NUM_CLASSES, IN_CHANNELS = 10, 1


class CIFAR10DataModule(TorchvisionClassificationDataModule):
    """CIFAR-10: 50 000 training and 10 000 test colour images, 3x32x32, 10 object classes."""

    dataset, folder = CIFAR10, "cifar-10-batches-py"
    NUM_CLASSES, IN_CHANNELS = 10, 3
