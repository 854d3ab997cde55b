"""Your own segmentation data: an ``images/`` and a ``masks/`` directory with matching file stems."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, random_split

from .base import ResizePair, SegmentationDataModule, mask_values

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class ImageMaskFolder(Dataset):
    """Pairs ``root/images/<stem>.*`` with ``root/masks/<stem>.*`` (any image format PIL reads).

    Masks store a class index per pixel (8- or 16-bit; an RGB mask is read from its first
    channel); with ``binary`` every non-zero value becomes class 1 (instance masks such as
    GlaS's gland labels). Every pair is checked when the data set is built (:meth:`check_pairs`),
    so a bad file stops the run before training, not mid-epoch.
    """

    def __init__(self, root: str | Path, transforms: ResizePair, binary: bool = False, num_classes: int | None = None):
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
        self.check_pairs(num_classes)

    def check_pairs(self, num_classes: int | None) -> None:
        """Raise ``ValueError`` naming the first file PIL cannot read or mask whose size is not its
        image's (``root: ...``), or the first mask that holds a label outside ``0..num_classes-1``
        (``num_classes: ...``).

        Labels are not checked with ``binary`` (any value is fine) or ``num_classes=None``. Cost:
        PIL reads each image's header only and decodes each mask once, e.g. about 1 s for a
        thousand 512x512 PNG masks on one core. Not checked: the pixel data behind a valid header of
        every image, and of every mask with ``binary`` or ``num_classes=None`` (a truncated file
        still fails when a batch loads it, mid-training); decoding each image too would cost
        about 2 ms per 512x512 JPEG and 5 ms per PNG more on one core.
        """
        for image_path, mask_path in self.pairs:
            with _open(image_path) as image, _open(mask_path) as mask:
                if image.size != mask.size:
                    raise ValueError(
                        f"root: mask {str(mask_path)!r} is {mask.width}x{mask.height} but its image {str(image_path)!r} "
                        f"is {image.width}x{image.height}; a mask must have its image's size"
                    )
                if num_classes is None or self.binary:
                    continue
                try:
                    values = mask_values(mask)
                except (OSError, SyntaxError) as err:  # "image file is truncated"; PIL's "broken PNG file"
                    raise ValueError(f"root: cannot read mask {str(mask_path)!r} ({err})") from err
                low, high = int(values.min()), int(values.max())
                if low < 0 or high >= num_classes:
                    raise ValueError(
                        f"num_classes: mask {str(mask_path)!r} holds label {high if high >= num_classes else low}, "
                        f"outside 0..{num_classes - 1} for num_classes={num_classes} "
                        "(data.binary=true makes every non-zero label foreground)"
                    )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image, mask = self.transforms(Image.open(image_path), Image.open(mask_path))
        return image, (mask > 0).long() if self.binary else mask


def _open(path: Path) -> Image.Image:
    """``Image.open(path)``; a file PIL cannot identify as an image raises ``ValueError("root: ...")``."""
    try:
        return Image.open(path)
    except UnidentifiedImageError as err:
        raise ValueError(f"root: {str(path)!r} is no image PIL can read (not an image, or damaged)") from err
    except OSError as err:  # e.g. permission denied
        raise ValueError(f"root: cannot read {str(path)!r} ({err.strerror or err})") from err


def validation_size(num_pairs: int, val_fraction: float) -> int:
    """How many of ``num_pairs`` validate: ``val_fraction`` of them, rounded, at least one."""
    return max(1, round(val_fraction * num_pairs))


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
        # Index and check the folder now, so a wrong path or file fails when the run is configured, not mid-setup.
        self.dataset = ImageMaskFolder(root, ResizePair(image_size), binary, num_classes)
        try:
            self.test_dataset = (
                None if test_root is None else ImageMaskFolder(test_root, ResizePair(image_size), binary, num_classes)
            )
        except (FileNotFoundError, ValueError) as err:
            if not str(err).startswith("root:"):
                raise  # num_classes: ... names its own key
            raise type(err)(f"test_{err}") from err  # the message names `root`; here it is test_root
        n_pairs = len(self.dataset)
        if n_pairs - validation_size(n_pairs, val_fraction) < 1:
            raise ValueError(
                f"val_fraction: {val_fraction} of {n_pairs} pair{'s' * (n_pairs != 1)} in {root!r} leaves no pair "
                "to train on (at least one pair validates); lower it or add pairs"
            )
        self.val_fraction, self.seed = val_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        n_val = validation_size(len(self.dataset), self.val_fraction)
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(
            self.dataset, [len(self.dataset) - n_val, n_val], generator=generator
        )
        self.test_set = self.test_dataset
