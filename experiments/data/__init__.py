"""One LightningDataModule per dataset family; each is selected by a ``configs/data/<name>.yaml``."""
from .digit_scenes import DigitScenesDataModule
from .digits import DigitsDataModule
from .folder import FolderDataModule
from .mnist_cifar import CIFAR10DataModule, MNISTDataModule
from .oxford_pet import OxfordPetDataModule
from .single_image import InpaintingDataModule, SuperResolutionDataModule

__all__ = [
    "CIFAR10DataModule", "DigitScenesDataModule", "DigitsDataModule", "FolderDataModule", "InpaintingDataModule",
    "MNISTDataModule", "OxfordPetDataModule", "SuperResolutionDataModule",
]
