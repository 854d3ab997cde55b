"""Networks that no library provides as they are needed here; each is selected by a ``configs/model/<name>.yaml``."""
from .classifiers import SmallCNN, resnet18_cifar

__all__ = ["SmallCNN", "resnet18_cifar"]
