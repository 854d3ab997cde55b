"""One LightningDataModule per dataset family; each is selected by a ``configs/data/<name>.yaml``."""
from .digit_scenes import DigitScenesDataModule
from .folder import FolderDataModule
from .oxford_pet import OxfordPetDataModule

__all__ = ["DigitScenesDataModule", "FolderDataModule", "OxfordPetDataModule"]
