"""DCGAN (Radford et al., 2016) for square images whose side is 4 * 2**k: a generator of 4x4 stride-2
transposed convolutions and a discriminator of 4x4 stride-2 convolutions.

Both are plain torch layers; ``xconv.convert`` turns the generator's ``ConvTranspose2d`` into
``XConvTranspose2d`` and the discriminator's ``Conv2d`` into ``XConv2d`` (even 4x4 kernels), and
their ReLU / LeakyReLU into the 1-bit versions.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _stages(image_size: int) -> int:
    """Number of doublings from the 4x4 base to ``image_size``; ValueError unless it is 4 * 2**k, k >= 1."""
    if not (isinstance(image_size, int) and image_size >= 8 and image_size & (image_size - 1) == 0):
        raise ValueError(f"image_size: DCGAN needs a power of two >= 8 (8, 16, 32, 64, ...), got {image_size!r}")
    return int(math.log2(image_size)) - 2


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")


def _dcgan_init(module: nn.Module) -> None:
    """The DCGAN paper's initialisation: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    """Latent codes [B, latent_dim] -> images [B, out_channels, image_size, image_size] in [-1, 1].

    A 4x4 transposed conv maps the code (as a 1x1 image) to a 4x4 map of ``width * 2**(k-1)``
    channels; each further 4x4 stride-2 transposed conv doubles the side and halves the
    channels (BatchNorm and ReLU between), the last one to ``out_channels`` with a tanh.

    Raises:
        ValueError: ``image_size`` is not a power of two >= 8, or ``latent_dim``, ``width``
            or ``out_channels`` is not a positive int.

    Example:
        >>> DCGANGenerator(latent_dim=16, out_channels=1, image_size=32, width=8)(torch.randn(2, 16)).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, latent_dim: int = 100, out_channels: int = 1, image_size: int = 32, width: int = 64):
        super().__init__()
        _check_positive(latent_dim=latent_dim, out_channels=out_channels, width=width)
        stages = _stages(image_size)
        self.latent_dim = latent_dim
        channels = width * 2 ** (stages - 1)
        layers = [nn.ConvTranspose2d(latent_dim, channels, 4, 1, 0, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                nn.ReLU(),
            ]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, out_channels, 4, 2, 1), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """Images [B, in_channels, image_size, image_size] in [-1, 1] -> real-vs-fake logits [B].

    Each 4x4 stride-2 conv halves the side and doubles the channels (from ``width``; LeakyReLU
    0.2 after each, BatchNorm after all but the first) down to 4x4; a last 4x4 conv without
    padding gives one logit.

    Raises:
        ValueError: ``image_size`` is not a power of two >= 8, or ``in_channels`` or ``width``
            is not a positive int.

    Example:
        >>> DCGANDiscriminator(in_channels=1, image_size=32, width=8)(torch.rand(2, 1, 32, 32)).shape
        torch.Size([2])
    """

    def __init__(self, in_channels: int = 1, image_size: int = 32, width: int = 64):
        super().__init__()
        _check_positive(in_channels=in_channels, width=width)
        stages = _stages(image_size)
        layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(stages - 1):
            layers += [
                nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels * 2), nn.LeakyReLU(0.2),
            ]
            channels *= 2
        layers += [nn.Conv2d(channels, 1, 4, 1, 0)]
        self.main = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images).flatten()


def dcgan(
    in_channels: int = 1,
    image_size: int = 32,
    latent_dim: int = 100,
    generator_width: int = 64,
    discriminator_width: int = 64,
) -> nn.ModuleDict:
    """A DCGAN pair in one module, ``{"generator": DCGANGenerator, "discriminator": DCGANDiscriminator}``.

    One module, so that ``xconv.convert`` converts both at once and its ``include`` /
    ``exclude`` patterns pick either (``generator.*``, ``discriminator.*``). The generator
    makes ``in_channels``-channel images, the channels of the data.

    Raises:
        ValueError: ``image_size`` is not a power of two >= 8, or another argument is not a
            positive int.

    Example:
        >>> net = dcgan(in_channels=3, image_size=16, latent_dim=8, generator_width=8, discriminator_width=8)
        >>> net["discriminator"](net["generator"](torch.randn(2, 8))).shape
        torch.Size([2])
    """
    # Checked here too, so that an error names this function's (the config's) argument.
    _check_positive(
        in_channels=in_channels, latent_dim=latent_dim, generator_width=generator_width,
        discriminator_width=discriminator_width,
    )
    return nn.ModuleDict({
        "generator": DCGANGenerator(latent_dim, in_channels, image_size, generator_width),
        "discriminator": DCGANDiscriminator(in_channels, image_size, discriminator_width),
    })
