"""Oxford-IIIT Pet trimap segmentation (torchvision), downloaded on first use."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import OxfordIIITPet

from .base import ResizePair, SegmentationDataModule

# Trimap values 1 = pet, 2 = background, 3 = border -> classes 0 = background, 1 = pet, 2 = border.
TRIMAP_TO_CLASS = torch.tensor([0, 1, 0, 2])


class OxfordPetDataModule(SegmentationDataModule):
    """Oxford-IIIT Pet: ``trainval`` split for training, ``test`` for validation, 3 classes.

    Images and trimaps are resized to ``image_size`` squares (see :class:`ResizePair`).
    """

    def __init__(
        self,
        data_dir: str = "data/",
        download: bool = True,
        image_size: int = 128,
        batch_size: int = 16,
        num_workers: int = 2,
        num_classes: int = 3,
        class_names: list[str] | None = None,
    ):
        super().__init__(batch_size, num_workers, num_classes, class_names)
        if num_classes != 3:
            raise ValueError(f"num_classes: Oxford-IIIT Pet trimaps have 3 classes, got {num_classes}")
        if not download and not (Path(data_dir) / "oxford-iiit-pet").is_dir():
            raise FileNotFoundError(
                f"data_dir: no oxford-iiit-pet directory under {str(data_dir)!r}; set data.download=true to fetch it"
            )
        self.data_dir, self.download = str(data_dir), download
        self.transforms = ResizePair(image_size, TRIMAP_TO_CLASS)

    def _split(self, split: str, download: bool = False) -> OxfordIIITPet:
        return OxfordIIITPet(
            self.data_dir, split, target_types="segmentation", transforms=self.transforms, download=download
        )

    def prepare_data(self) -> None:
        if self.download:
            self._split("trainval", download=True)

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = self._split("trainval"), self._split("test")
