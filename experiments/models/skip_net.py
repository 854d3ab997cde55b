"""The deep-image-prior encoder-decoder: an hourglass of strided convolutions with skip branches."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _conv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding_mode: str,
                negative_slope: float) -> list[nn.Module]:
    """Conv -> BatchNorm -> LeakyReLU, "same"-size padding (halving the size when ``stride`` is 2)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                     padding_mode=padding_mode)
    return [conv, _norm(out_channels), nn.LeakyReLU(negative_slope)]


def _norm(channels: int) -> nn.BatchNorm2d:
    # The network only ever sees one input (a fixed noise image), so it always normalises with
    # the statistics of the batch at hand: in training and in evaluation alike, no running
    # averages that would lag behind the weights.
    return nn.BatchNorm2d(channels, track_running_stats=False)


class _EmptySkip(nn.Module):
    """A skip branch of 0 channels: a slice of the input with no channels, for ``torch.cat``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


class SkipNet(nn.Module):
    """Encoder-decoder with skip connections, the image generator of deep image prior (Ulyanov et al.).

    Scale ``i`` (``i = 0 .. len(channels) - 1``) of the encoder halves the size with a strided
    ``kernel_size`` conv and applies a second conv, each followed by BatchNorm and LeakyReLU,
    with ``channels[i]`` channels. Before each halving a skip branch (1x1 conv, BatchNorm,
    LeakyReLU) keeps ``skip_channels[i]`` channels at the finer size. The decoder goes back up
    scale by scale: ``upsample`` interpolation to the skip's size, concatenation with the skip,
    BatchNorm, a ``kernel_size`` conv to ``channels[i]`` channels and a 1x1 conv, each followed
    by BatchNorm and LeakyReLU. A 1x1 conv and a sigmoid give the image. Every conv and
    activation is a plain torch layer, so ``xconv.convert`` replaces the convs by XConv layers
    and the ``nn.LeakyReLU``s by 1-bit ones; all 3x3 convs use ``padding_mode``, the same in
    exact and XConv runs.

    Any input size above ``2 ** len(channels)`` works: the decoder interpolates to each skip's
    exact size, so sizes need not be divisible by it, and the coarsest scale keeps at least 2x2
    pixels (reflection padding and BatchNorm of a single image need them).

    Args:
        in_channels: channels of the input (the fixed noise).
        out_channels: channels of the output image.
        channels: channels per scale, one entry per scale (the paper: 5 scales of 128).
        skip_channels: channels of the skip branch per scale (one int for all scales); 0 drops
            that scale's skip.
        kernel_size: odd size of the non-1x1 convs.
        padding_mode: padding of those convs: ``"reflect"``, ``"zeros"``, ``"replicate"`` or ``"circular"``.
        upsample: ``"bilinear"``, ``"nearest"`` or ``"bicubic"`` (``F.interpolate`` modes).
        negative_slope: of the LeakyReLUs.

    Shape: ``[B, in_channels, H, W]`` -> ``[B, out_channels, H, W]``, values in (0, 1).

    Raises:
        ValueError: empty ``channels``, a ``skip_channels`` list of another length or with a
            negative entry, an even ``kernel_size``, or an unknown ``upsample`` mode; in
            ``forward``, an input of at most ``2 ** len(channels)`` pixels in height or width.

    Example:
        >>> net = SkipNet(in_channels=8, channels=[16, 16, 16], skip_channels=4)
        >>> net(torch.rand(1, 8, 40, 44)).shape
        torch.Size([1, 3, 40, 44])
    """

    UPSAMPLE_MODES = ("bilinear", "nearest", "bicubic")

    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int = 3,
        channels: Sequence[int] = (128, 128, 128, 128, 128),
        skip_channels: int | Sequence[int] = 4,
        kernel_size: int = 3,
        padding_mode: str = "reflect",
        upsample: str = "bilinear",
        negative_slope: float = 0.2,
    ):
        super().__init__()
        channels = list(channels)
        skips = [skip_channels] * len(channels) if isinstance(skip_channels, int) else list(skip_channels)
        if not channels:
            raise ValueError("channels: need at least one scale, got []")
        if len(skips) != len(channels) or min(skips) < 0:
            raise ValueError(
                f"skip_channels: need one int >= 0 or {len(channels)} of them (one per scale), got {skip_channels}"
            )
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: must be odd, got {kernel_size}")
        if upsample not in self.UPSAMPLE_MODES:
            raise ValueError(f"upsample: must be one of {list(self.UPSAMPLE_MODES)}, got {upsample!r}")
        self.upsample = upsample
        block = dict(padding_mode=padding_mode, negative_slope=negative_slope)
        self.down, self.skip, self.up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        finer = in_channels
        for i, (c, s) in enumerate(zip(channels, skips)):
            self.down.append(nn.Sequential(
                *_conv_block(finer, c, kernel_size, 2, **block), *_conv_block(c, c, kernel_size, 1, **block)
            ))
            self.skip.append(nn.Sequential(*_conv_block(finer, s, 1, 1, **block)) if s else _EmptySkip())
            coarser = channels[i + 1] if i + 1 < len(channels) else c  # what the decoder brings up
            self.up.append(nn.Sequential(
                _norm(s + coarser), *_conv_block(s + coarser, c, kernel_size, 1, **block),
                *_conv_block(c, c, 1, 1, **block),
            ))
            finer = c
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def check_input(self, height: int, width: int) -> None:
        """Raise ValueError when an input of ``height`` x ``width`` pixels is too small for the scales."""
        # Each scale halves the size, rounding up: the coarsest is ceil(size / 2**scales).
        smallest = 2 ** len(self.down) + 1
        if min(height, width) < smallest:
            raise ValueError(
                f"model.channels: {len(self.down)} scales need an input of at least {smallest}x{smallest} pixels, "
                f"got {height}x{width} (larger images: data.crop / data.resize; fewer scales: model.channels)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(*x.shape[-2:])
        skips = []
        for down, skip in zip(self.down, self.skip):
            skips.append(skip(x))
            x = down(x)
        for up, skip in zip(reversed(self.up), reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode=self.upsample)
            x = up(torch.cat([skip, x], dim=1))
        return torch.sigmoid(self.head(x))
