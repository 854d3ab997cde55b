"""Image classifiers for small images: the paper's MNIST-style CNN and a CIFAR-style torchvision ResNet-18."""
from __future__ import annotations

import torch
import torchvision
from torch import nn


class SmallCNN(nn.Module):
    """Per stage a 3x3 conv (padding 1), ReLU and 2x2 max-pool; then one dense layer to the classes.

    images [B, in_channels, image_size, image_size] -> logits [B, num_classes]. The default
    channels 1-16-32-32 follow the paper's MNIST network. Each stage halves the side (rounding
    down), so the dense layer sees ``channels[-1] * (image_size // 2**len(channels))**2`` features.

    Example:
        >>> SmallCNN(in_channels=1, num_classes=10, image_size=32)(torch.rand(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, ...] = (16, 32, 32),
        image_size: int = 28,
    ):
        super().__init__()
        side = image_size // 2 ** len(channels)
        if side < 1:
            raise ValueError(f"image_size: {len(channels)} max-pools need >= {2 ** len(channels)}, got {image_size}")
        layers = []
        for c_in, c_out in zip([in_channels, *channels[:-1]], channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels[-1] * side**2, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> torchvision.models.ResNet:
    """torchvision's ResNet-18 for 32x32 images: a 3x3 stride-1 stem and no max-pool (He et al.'s CIFAR stem).

    images [B, in_channels, H, W] -> logits [B, num_classes]. The ImageNet stem (7x7 stride 2,
    then a max-pool) would shrink a 32x32 image to 8x8 before the first block.

    Example:
        >>> resnet18_cifar(num_classes=10)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # The initialisation torchvision gives every other conv of the network.
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net
