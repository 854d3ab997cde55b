"""Networks that no library provides as they are needed here; each is selected by a ``configs/model/<name>.yaml``."""
from .classifiers import SmallCNN, resnet18_cifar
from .dcgan import DCGANDiscriminator, DCGANGenerator, dcgan
from .skip_net import SkipNet

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "SkipNet", "SmallCNN", "dcgan", "resnet18_cifar"]
