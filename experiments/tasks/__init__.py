"""One LightningModule per task; each is selected by a ``configs/task/<name>.yaml``."""
from .base import XConvTask
from .classification import ClassificationTask
from .gan import GANTask
from .image_prior import ImagePriorTask, InpaintingTask, SuperResolutionTask
from .segmentation import SegmentationTask

__all__ = [
    "ClassificationTask", "GANTask", "ImagePriorTask", "InpaintingTask", "SegmentationTask", "SuperResolutionTask",
    "XConvTask",
]
