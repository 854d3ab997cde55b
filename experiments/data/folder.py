"""Your own segmentation data: an ``images/`` and a ``masks/`` directory with matching file stems."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, random_split

from .base import ResizePair, SegmentationDataModule

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class ImageMaskFolder(Dataset):
    """Pairs ``root/images/<stem>.*`` with ``root/masks/<stem>.*`` (any image format PIL reads).

    Masks store a class index per pixel; with ``binary`` every non-zero value becomes class 1
    (instance masks such as GlaS's gland labels).
    """

    def __init__(self, root: str | Path, transforms: ResizePair, binary: bool = False):
        root = Path(root)
        for sub in ("images", "masks"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"root: {str(root)!r} has no {sub}/ directory (expected images/ and masks/)")
        masks = {p.stem: p for p in sorted((root / "masks").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        images = [p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        unmatched = [p.name for p in images if p.stem not in masks]
        if not images or unmatched:
            raise FileNotFoundError(
                f"root: images without a mask of the same stem in {str(root / 'masks')!r}: {unmatched[:5]}"
                if unmatched else f"root: no images in {str(root / 'images')!r}"
            )
        self.pairs = [(p, masks[p.stem]) for p in images]
        self.transforms, self.binary = transforms, binary

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image, mask = self.transforms(Image.open(image_path), Image.open(mask_path))
        return image, (mask > 0).long() if self.binary else mask


class FolderDataModule(SegmentationDataModule):
    """An :class:`ImageMaskFolder` split at random (from ``seed``) into train and ``val_fraction`` validation.

    ``test_root``, if given, is a second folder of the same layout held out as the test split
    (e.g. GlaS's test images): validation, and with it any model selection, never sees it.
    """

    def __init__(
        self,
        root: str,
        num_classes: int,
        class_names: list[str] | None = None,
        binary: bool = False,
        image_size: int = 128,
        val_fraction: float = 0.2,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        test_root: str | None = None,
    ):
        super().__init__(batch_size, num_workers, num_classes, class_names)
        if binary and num_classes != 2:
            raise ValueError(f"num_classes: binary masks have 2 classes, got {num_classes}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction: must lie in (0, 1), got {val_fraction}")
        # Index the folder now, so a wrong path fails when the run is configured, not mid-setup.
        self.dataset = ImageMaskFolder(root, ResizePair(image_size), binary)
        try:
            self.test_dataset = None if test_root is None else ImageMaskFolder(test_root, ResizePair(image_size), binary)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"test_{err}") from err  # the message names `root`; here it is test_root
        self.val_fraction, self.seed = val_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        n_val = max(1, round(self.val_fraction * len(self.dataset)))
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(
            self.dataset, [len(self.dataset) - n_val, n_val], generator=generator
        )
        self.test_set = self.test_dataset
