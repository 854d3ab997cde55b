"""Digit-texture scenes: an offline semantic-segmentation set built from real data that ships with pip packages.

Each scene is a crop of a real photographic texture from ``skimage.data`` (brick, grass,
gravel, ...) with one or more of scikit-learn's real handwritten digits (``load_digits``,
8x8 scans) upscaled with cubic-spline smoothing and pasted on it in a contrasting ink. The
mask labels each digit's stroke pixels with ``1 + digit`` and everything else with 0, so
there are 11 classes. Scenes are synthetic compositions of real images; they are not a
benchmark from the literature.
"""
from __future__ import annotations

import numpy as np
import skimage.data
import torch
from skimage.color import gray2rgb
from skimage.transform import resize
from skimage.util import img_as_float32
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from .base import SegmentationDataModule

NUM_CLASSES = 11
# Where a smoothed digit (values in [0, 1]) counts as stroke; the ink blends in around it.
STROKE_THRESHOLD = 0.4
INK_RAMP = 0.4


def load_texture(name: str) -> np.ndarray:
    """``skimage.data.<name>()`` as float RGB in [0, 1], shape [h, w, 3]."""
    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise ValueError(f"textures: {name!r} is not an image loader in skimage.data")
    image = img_as_float32(loader())
    if image.ndim not in (2, 3):
        raise ValueError(f"textures: skimage.data.{name}() is not a 2-d image")
    return gray2rgb(image) if image.ndim == 2 else image[..., :3]


def render_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """Upscale an 8x8 ``load_digits`` scan (values 0..16) to a smooth [size, size] map in [0, 1]."""
    # The zero border lets the cubic spline fall to 0 at the edge instead of clamping strokes.
    padded = np.pad(digit / 16.0, 1)
    return resize(padded, (size, size), order=3, mode="constant", clip=True).astype(np.float32)


def texture_crop(texture: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop (1x to 2x the output size), resized to [image_size, image_size, 3] and randomly flipped."""
    h, w = texture.shape[:2]
    crop = int(rng.integers(image_size, min(2 * image_size, h, w) + 1))
    top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    patch = resize(texture[top : top + crop, left : left + crop], (image_size, image_size), anti_aliasing=True)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(np.rot90(patch, int(rng.integers(4)))).astype(np.float32)


def compose_scene(
    digits: np.ndarray,
    labels: np.ndarray,
    textures: list[np.ndarray],
    image_size: int,
    digits_per_scene: tuple[int, int],
    digit_size: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One scene from the digit pool ``digits`` [N, 8, 8] with ``labels`` [N].

    Returns:
        image [3, image_size, image_size] uint8 and mask [image_size, image_size] uint8 in 0..10.
        A later digit overwrites an earlier one where they overlap, in the image and the mask alike.
    """
    image = texture_crop(textures[rng.integers(len(textures))], image_size, rng)
    mask = np.zeros((image_size, image_size), np.uint8)
    for _ in range(rng.integers(digits_per_scene[0], digits_per_scene[1] + 1)):
        index = rng.integers(len(digits))
        size = int(rng.integers(digit_size[0], digit_size[1] + 1))
        strength = render_digit(digits[index], size)
        top, left = rng.integers(0, image_size - size + 1, size=2)
        window = (slice(top, top + size), slice(left, left + size))
        # Ink contrasts with the local background: dark on bright textures, bright on dark ones.
        base = 0.1 if image[window].mean() > 0.5 else 0.9
        ink = np.clip(base + rng.uniform(-0.2, 0.2, 3), 0.0, 1.0).astype(np.float32)
        alpha = np.clip((strength - STROKE_THRESHOLD) / INK_RAMP + 0.5, 0.0, 1.0)[..., None]
        image[window] = (1 - alpha) * image[window] + alpha * ink
        mask[window][strength > STROKE_THRESHOLD] = 1 + labels[index]
    return (image.transpose(2, 0, 1) * 255).round().astype(np.uint8), mask


class DigitScenesDataModule(SegmentationDataModule):
    """Digit-texture scenes (see module docstring), rendered once in :meth:`setup`.

    Batches are ``(images, masks)``: images float32 [B, 3, H, W] in [0, 1], masks int64 [B, H, W]
    in 0..10. Everything is a function of ``seed``. The train and validation scenes draw
    their digits from disjoint parts of ``load_digits`` (split stratified by digit,
    ``val_fraction`` to validation); the textures are shared.

    Example:
        >>> dm = DigitScenesDataModule(train_scenes=8, val_scenes=4, batch_size=4)
        >>> dm.setup("fit")
        >>> images, masks = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), tuple(masks.shape)
        ((4, 3, 64, 64), (4, 64, 64))
    """

    def __init__(
        self,
        image_size: int = 64,
        train_scenes: int = 4000,
        val_scenes: int = 400,
        digits_per_scene: tuple[int, int] = (1, 3),
        digit_size: tuple[int, int] = (20, 32),
        textures: tuple[str, ...] = ("brick", "grass", "gravel"),
        val_fraction: float = 0.25,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        num_classes: int = NUM_CLASSES,
        class_names: list[str] | None = None,
    ):
        super().__init__(batch_size, num_workers, num_classes, class_names)
        if num_classes != NUM_CLASSES:
            raise ValueError(f"num_classes: digit scenes have {NUM_CLASSES} classes, got {num_classes}")
        if not 1 <= digit_size[0] <= digit_size[1] <= image_size:
            raise ValueError(f"digit_size: need 1 <= min <= max <= image_size={image_size}, got {list(digit_size)}")
        self.textures = [load_texture(name) for name in textures]
        self.image_size, self.seed, self.val_fraction = image_size, seed, val_fraction
        self.counts = {"train": train_scenes, "val": val_scenes}
        self.digits_per_scene, self.digit_size = tuple(digits_per_scene), tuple(digit_size)

    def _render(self, digits: np.ndarray, labels: np.ndarray, split: str) -> TensorDataset:
        # One random stream per split, so changing val_scenes leaves the training scenes alone.
        rng = np.random.default_rng([self.seed, ("train", "val").index(split)])
        scenes = [
            compose_scene(digits, labels, self.textures, self.image_size, self.digits_per_scene, self.digit_size, rng)
            for _ in range(self.counts[split])
        ]
        images = torch.from_numpy(np.stack([image for image, _ in scenes])).float().div_(255)
        masks = torch.from_numpy(np.stack([mask for _, mask in scenes])).long()
        return TensorDataset(images, masks)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        source = load_digits()
        train_idx, val_idx = train_test_split(
            np.arange(len(source.target)), test_size=self.val_fraction, stratify=source.target, random_state=self.seed
        )
        # Which load_digits samples each split draws from (disjoint), kept for inspection.
        self.source_indices = {"train": train_idx, "val": val_idx}
        self.train_set = self._render(source.images[train_idx], source.target[train_idx], "train")
        self.val_set = self._render(source.images[val_idx], source.target[val_idx], "val")
