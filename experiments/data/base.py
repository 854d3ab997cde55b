"""What the data modules share: loaders over the splits, class bookkeeping and the resize of a segmentation pair."""
from __future__ import annotations

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def is_number(value) -> bool:
    """Whether ``value`` is an int or float (bools, strings and None are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, least: int) -> None:
    """Raise ``ValueError("<name>: must be an int >= <least>, got ...")`` unless ``value`` is such an int.

    Hydra passes ``4.0`` or ``"abc"`` through as given; they would otherwise fail deep inside torch.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}: must be an int >= {least}, got {value!r}")


class SplitsDataModule(L.LightningDataModule):
    """Loaders over ``self.train_set`` / ``self.val_set`` and, where the data has one, ``self.test_set``.

    Subclasses fill them in ``setup``; ``test_set`` stays None for data without a held-out test
    split, and ``run.py`` then skips ``trainer.test``.
    """

    def __init__(self, batch_size: int, num_workers: int):
        """
        Raises:
            ValueError: ``batch_size`` not an int >= 1 or ``num_workers`` not an int >= 0.
        """
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset, self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``batch_size``; a last batch of a single sample is dropped, as
        BatchNorm cannot train on one sample where a map has shrunk to 1x1 (a U-Net's bottleneck
        at ``image_size`` < 64). Other last batches are kept, so the runs are as before."""
        size = len(self.train_set)
        return self._loader(self.train_set, shuffle=True, drop_last=size > 1 and size % self.batch_size == 1)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class SegmentationDataModule(SplitsDataModule):
    """Both sets yield ``(image float32 [3, H, W] in [0, 1], mask int64 [H, W] in 0..num_classes-1)``."""

    def __init__(self, batch_size: int, num_workers: int, num_classes: int, class_names: list[str] | None):
        super().__init__(batch_size, num_workers)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected num_classes={num_classes} names, got {len(class_names)}")


class ClassificationDataModule(SplitsDataModule):
    """Train, validation and a held-out test split, filled in ``setup``.

    Every set yields ``(image float32 [in_channels, image_size, image_size] in [0, 1], label int64 [])``.
    Subclasses state what their data set has in ``NUM_CLASSES`` and ``IN_CHANNELS``. The
    constructor takes both too (None: the data set's), so that a config can state them for the
    model (``${data.num_classes}``), and checks them.
    """

    NUM_CLASSES: int
    IN_CHANNELS: int

    def __init__(self, batch_size: int, num_workers: int, num_classes: int | None, in_channels: int | None):
        super().__init__(batch_size, num_workers)
        given = {"num_classes": (num_classes, self.NUM_CLASSES), "in_channels": (in_channels, self.IN_CHANNELS)}
        for name, (value, actual) in given.items():
            if value is not None and value != actual:
                raise ValueError(f"{name}: {type(self).__name__} has {actual}, got {value}")


def mask_values(mask: Image.Image) -> torch.Tensor:
    """The value stored per pixel of a mask, [H, W], as PIL decodes it (the first channel of an RGB mask).

    A 16-bit mask (PIL's ``I;16``) comes as int32: torch has few operations for uint16 (no
    ``min``/``max``).
    """
    values = F.pil_to_tensor(mask)[0]
    return values.to(torch.int32) if values.dtype == torch.uint16 else values


class ResizePair:
    """(PIL image, PIL mask) -> (image float32 [3, size, size] in [0, 1], mask int64 [size, size]).

    Image and mask are resized together, as torchvision's ``v2.Resize`` resizes an ``Image`` and
    a ``Mask``: the image with antialiasing, the mask with nearest neighbour so labels stay
    labels. A pair whose sizes differ raises ``ValueError`` rather than have its mask stretched
    to fit. ``labels`` (a lookup table, new = labels[old]) maps stored mask values to classes.
    """

    def __init__(self, size: int, labels: torch.Tensor | None = None):
        self.resize, self.labels = v2.Resize([size, size], antialias=True), labels

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if image.size != mask.size:
            raise ValueError(f"image is {image.width}x{image.height} but its mask {mask.width}x{mask.height}; "
                             "a pair is resized together only where the sizes agree")
        image = tv_tensors.Image(F.to_dtype(F.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True))
        image, mask = self.resize(image, tv_tensors.Mask(mask_values(mask)))
        mask = mask.as_subclass(torch.Tensor).long()
        return image.as_subclass(torch.Tensor), mask if self.labels is None else self.labels[mask]
