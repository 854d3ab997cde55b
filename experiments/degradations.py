"""The observation operators of the image-restoration tasks, shared by the data that makes an
observation and the task whose loss degrades the network's output the same way."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def downsample(images: torch.Tensor, scale: int) -> torch.Tensor:
    """The super-resolution degradation: bicubic downscaling with antialiasing by an integer ``scale``.

    The kernel is PIL's ``Image.resize(..., BICUBIC)`` (Keys cubic, a = -0.5, stretched by
    ``scale`` to low-pass before decimating, as MATLAB's ``imresize`` does), through
    ``F.interpolate(mode="bicubic", antialias=True)``. The same function makes the low-resolution
    observation and degrades the network's output in the loss.

    Shape: ``[B, C, H, W]`` -> ``[B, C, H / scale, W / scale]``, always float32: under
    mixed precision the network's bf16 output is upcast first (torch has no CPU bf16 kernel for
    antialiased bicubic, and the degradation is part of the loss, which stays fp32).

    Raises:
        ValueError: ``H`` or ``W`` not divisible by ``scale``.
    """
    height, width = images.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"scale: image size {height}x{width} is not divisible by scale {scale}")
    return F.interpolate(images.float(), size=(height // scale, width // scale), mode="bicubic", antialias=True)
