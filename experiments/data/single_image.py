"""One image for deep image prior: the clean image, its degraded observation and the network's fixed noise input.

Deep image prior fits a network to a single degraded image, so a "data set" here is one image:
a scikit-image sample (``image=astronaut``, nothing downloaded) or a file in a folder of your
own (``root=/path/Set5 image=baby``). The training loader repeats the one observation
``steps_per_epoch`` times, so a Lightning epoch is a block of iterations and validation (the
output against the clean image) runs after each block. The training batches never hold the
clean image; only validation does.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import skimage.data
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..degradations import downsample
from .base import check_int, is_number
from .folder import IMAGE_SUFFIXES

# Photographs (and a few textures and scans) whose files ship inside the scikit-image wheel.
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)
SCALES = (2, 3, 4, 8)
MASKS = ("random", "text", "file")


def load_image(image: str, root: str | None = None) -> torch.Tensor:
    """``skimage.data.<image>()`` (``root`` None) or the file ``image`` (name or stem) in ``root``, as RGB.

    Grey images are repeated over three channels; an alpha channel is dropped.

    Returns:
        float32 [3, H, W] in [0, 1].
    Raises:
        ValueError: ``image`` is not in :data:`SKIMAGE_IMAGES` (``root`` None).
        FileNotFoundError: ``root`` is not a directory, or holds no image file named ``image``.
    """
    if root is None:
        if image not in SKIMAGE_IMAGES:
            raise ValueError(
                f"image: must be one of scikit-image's {list(SKIMAGE_IMAGES)}, or a file in data.root, got {image!r}"
            )
        picture = Image.fromarray(getattr(skimage.data, image)())
    else:
        picture = Image.open(find_image_file(Path(root), image))
    return TF.to_dtype(TF.pil_to_tensor(picture.convert("RGB")), torch.float32, scale=True)


def find_image_file(root: Path, image: str) -> Path:
    """The file in ``root`` named ``image`` or with stem ``image`` (e.g. ``baby`` for ``baby.png``).

    Raises:
        FileNotFoundError: ``root`` is not a directory, or holds no such image file.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"root: no directory {str(root)!r} (a folder of images; data.image names one)")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    matches = [p for p in files if image in (p.name, p.stem)]
    if not matches:
        raise FileNotFoundError(
            f"image: no image file {image!r} in {str(root)!r}; it holds {[p.stem for p in files][:20]}"
        )
    return matches[0]


def fit_image(
    image: torch.Tensor,
    resize: int | None,
    crop: int | None,
    multiple: int = 1,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
) -> torch.Tensor:
    """Resize the shorter side to ``resize``, centre-crop a ``crop`` x ``crop`` square, trim to a ``multiple``.

    ``None`` skips a step. Resizing antialiases; masks pass ``interpolation=NEAREST`` so they stay
    binary. The final trim (centred) makes both sides divisible by ``multiple`` (the scale
    factor, for super-resolution).

    Shape: ``[C, H, W]`` -> ``[C, H', W']``.

    Raises:
        ValueError: ``crop`` larger than the (resized) image.
    """
    if resize is not None:
        image = TF.resize(image, [resize], interpolation=interpolation, antialias=True)
    if crop is not None:
        if crop > min(image.shape[-2:]):
            raise ValueError(f"crop: {crop} exceeds the image's shorter side ({min(image.shape[-2:])} after resize)")
        image = TF.center_crop(image, [crop, crop])
    height, width = image.shape[-2:]
    return TF.center_crop(image, [height - height % multiple, width - width % multiple])


def random_mask(
    height: int, width: int, hole_fraction: float, hole_size: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Holes at random: the image is tiled by ``hole_size`` squares and ``hole_fraction`` of them are dropped.

    Exactly ``round(hole_fraction * tiles)`` tiles are holes, so the hole fraction is exact when
    ``hole_size`` divides both sides (``hole_size=1``: random pixels).

    Returns:
        float32 [1, height, width], 1 where the pixel is known, 0 in a hole.
    Raises:
        ValueError: ``hole_fraction`` not a number in [0, 1) or ``hole_size`` not an int >= 1.
    """
    if not is_number(hole_fraction) or not 0 <= hole_fraction < 1:
        raise ValueError(f"hole_fraction: must be a number in [0, 1), got {hole_fraction!r}")
    check_int("hole_size", hole_size, 1)
    rows, cols = math.ceil(height / hole_size), math.ceil(width / hole_size)
    tiles = torch.ones(rows * cols)
    tiles[torch.randperm(rows * cols, generator=generator)[: round(hole_fraction * rows * cols)]] = 0
    mask = tiles.view(rows, cols).repeat_interleave(hole_size, 0).repeat_interleave(hole_size, 1)
    return mask[None, :height, :width].contiguous()


def text_mask(height: int, width: int, text: str, font_size: int) -> torch.Tensor:
    """Text written over the whole image: rows of ``text`` in PIL's default font, every other line.

    Each row starts further left than the one above, so the words do not stack into columns.

    Returns:
        float32 [1, height, width], 1 where the pixel is known, 0 under a letter.
    Raises:
        ValueError: empty ``text`` or ``font_size`` not an int >= 1.
    """
    if not text:
        raise ValueError("text: must not be empty")
    check_int("font_size", font_size, 1)
    canvas = Image.new("L", (width, height), 255)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=font_size)
    line = f"{text} "
    repeats = math.ceil(2 * width / max(1, draw.textlength(line, font=font))) + 1
    for row, top in enumerate(range(0, height, 2 * font_size)):
        draw.text((-(row * 3 * font_size) % width - width, top), line * repeats, fill=0, font=font)
    return torch.from_numpy(np.asarray(canvas) >= 128).float()[None]


def load_mask(path: str | Path) -> torch.Tensor:
    """A mask image (any format PIL reads): light pixels (>= 128 in greyscale) are known, dark ones holes.

    Returns:
        float32 [1, H, W] in {0, 1}.
    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file PIL cannot read as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask_file: no file {str(path)!r}")
    try:
        picture = Image.open(path)
    except UnidentifiedImageError as err:
        raise ValueError(f"mask_file: {str(path)!r} is not an image file PIL can read") from err
    return torch.from_numpy(np.asarray(picture.convert("L")) >= 128).float()[None]


class _Repeated(Dataset):
    """The same sample ``length`` times."""

    def __init__(self, sample: dict[str, torch.Tensor], length: int):
        self.sample, self.length = sample, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample


class SingleImageDataModule(L.LightningDataModule):
    """One image, degraded by :meth:`observe`; subclasses define the degradation.

    Training batches are dicts of one sample: ``noise`` float32 [1, input_channels, H, W] (uniform
    in [0, noise_scale], fixed from ``seed``; the network's input), ``observed`` (the degraded
    image) and whatever else :meth:`observe` returns. Validation batches add ``clean`` float32
    [1, 3, H, W] in [0, 1], the ground truth. ``H``, ``W`` are the clean image's size after
    :func:`fit_image`.

    Args:
        image: a name in :data:`SKIMAGE_IMAGES`, or with ``root`` a file name or stem there.
        root: a folder of images (e.g. Set5, Set14), or None for scikit-image's.
        resize, crop: see :func:`fit_image`; None keeps the full image.
        input_channels, noise_scale: the noise input.
        steps_per_epoch: training iterations per epoch (between validations).
        seed: seeds the noise (and a random mask).

    Raises:
        ValueError, FileNotFoundError: from :func:`load_image` and :func:`fit_image`, naming the argument;
            ``resize``, ``crop`` not None or an int >= 1; ``input_channels``, ``steps_per_epoch`` not
            an int >= 1; ``noise_scale`` not a number > 0.
    """

    multiple = 1  # both sides of the clean image are trimmed to a multiple of this

    def __init__(
        self,
        image: str = "astronaut",
        root: str | None = None,
        resize: int | None = None,
        crop: int | None = None,
        input_channels: int = 32,
        noise_scale: float = 0.1,
        steps_per_epoch: int = 100,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (("resize", resize), ("crop", crop)):
            if value is not None:
                check_int(name, value, 1)
        check_int("input_channels", input_channels, 1)
        check_int("steps_per_epoch", steps_per_epoch, 1)
        if not is_number(noise_scale) or not noise_scale > 0:
            raise ValueError(f"noise_scale: must be a number > 0, got {noise_scale!r}")
        self.steps_per_epoch = steps_per_epoch
        self.generator = torch.Generator().manual_seed(seed)
        # Everything is built here, not in setup(): it takes milliseconds, and a bad image name,
        # path or size then fails when the run is configured.
        original = load_image(image, root)
        self.original_size = tuple(original.shape[-2:])
        self.geometry = dict(resize=resize, crop=crop, multiple=self.multiple)
        self.clean = fit_image(original, **self.geometry)
        height, width = self.clean.shape[-2:]
        noise = torch.rand(input_channels, height, width, generator=self.generator) * noise_scale
        self.train_sample = {"noise": noise, **self.observe(self.clean)}
        self.val_sample = {**self.train_sample, "clean": self.clean}

    def observe(self, clean: torch.Tensor) -> dict[str, torch.Tensor]:
        """The degraded observation (key ``observed``) and what else the loss needs, from ``clean`` [3, H, W]."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeated(self.train_sample, self.steps_per_epoch), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Repeated(self.val_sample, 1), batch_size=1)


class SuperResolutionDataModule(SingleImageDataModule):
    """The clean image is the high-resolution target; ``observed`` [1, 3, H/scale, W/scale] is its :func:`downsample`.

    Other arguments: see :class:`SingleImageDataModule`.

    Raises:
        ValueError: ``scale`` not in :data:`SCALES`; see :class:`SingleImageDataModule`.

    Example:
        >>> dm = SuperResolutionDataModule("astronaut", resize=64, crop=64, scale=4)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> tuple(batch["noise"].shape), tuple(batch["observed"].shape)
        ((1, 32, 64, 64), (1, 3, 16, 16))
    """

    def __init__(self, image: str = "astronaut", scale: int = 4, **kwargs):
        if isinstance(scale, bool) or not isinstance(scale, int) or scale not in SCALES:
            raise ValueError(f"scale: must be one of {list(SCALES)}, got {scale!r}")
        self.scale = self.multiple = scale
        super().__init__(image, **kwargs)

    def observe(self, clean: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"observed": downsample(clean[None], self.scale)[0]}


class InpaintingDataModule(SingleImageDataModule):
    """The observation is the image with holes: ``observed`` [1, 3, H, W] = clean * ``mask`` [1, 1, H, W].

    ``mask`` (in every batch) is 1 where a pixel is known and 0 in a hole.

    Args:
        mask: ``"random"`` (:func:`random_mask` with ``hole_fraction``, ``hole_size``, from
            ``seed``), ``"text"`` (:func:`text_mask` with ``text``, ``font_size``) or ``"file"``
            (:func:`load_mask` of ``mask_file``, which must have the image's original size; it
            is resized and cropped with the image).
        other arguments: see :class:`SingleImageDataModule`.

    Raises:
        ValueError: ``mask`` not in :data:`MASKS`, ``mask="file"`` without ``mask_file`` (or
            ``mask_file`` with another ``mask``), a mask
            file of another size than the image, bad ``hole_fraction``/``hole_size``/``text``/``font_size``.
        FileNotFoundError: no file at ``mask_file``.

    Example:
        >>> dm = InpaintingDataModule("astronaut", resize=64, crop=64, mask="random", hole_fraction=0.5)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> tuple(batch["observed"].shape), batch["mask"].mean().item()
        ((1, 3, 64, 64), 0.5)
    """

    def __init__(
        self,
        image: str = "astronaut",
        mask: str = "text",
        hole_fraction: float = 0.5,
        hole_size: int = 1,
        text: str = "deep image prior",
        font_size: int = 12,
        mask_file: str | None = None,
        **kwargs,
    ):
        if mask not in MASKS:
            raise ValueError(f"mask: must be one of {list(MASKS)}, got {mask!r}")
        if mask == "file" and mask_file is None:
            raise ValueError("mask_file: mask=file needs a mask image, e.g. data.mask_file=/path/mask.png")
        if mask != "file" and mask_file is not None:
            raise ValueError(f"mask_file: read only with mask=file, got mask={mask!r}")
        self.mask_kind, self.hole_fraction, self.hole_size = mask, hole_fraction, hole_size
        self.text, self.font_size, self.mask_file = text, font_size, mask_file
        super().__init__(image, **kwargs)

    def observe(self, clean: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = clean.shape[-2:]
        if self.mask_kind == "random":
            mask = random_mask(height, width, self.hole_fraction, self.hole_size, self.generator)
        elif self.mask_kind == "text":
            mask = text_mask(height, width, self.text, self.font_size)
        else:
            mask = load_mask(self.mask_file)
            if tuple(mask.shape[-2:]) != self.original_size:
                raise ValueError(
                    f"mask_file: mask size {tuple(mask.shape[-2:])} differs from the image's {self.original_size}"
                )
            mask = fit_image(mask, **self.geometry, interpolation=InterpolationMode.NEAREST)
        return {"observed": clean * mask, "mask": mask}
