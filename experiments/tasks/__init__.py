"""One LightningModule per task; each is selected by a ``configs/task/<name>.yaml``."""
from .base import XConvTask
from .classification import ClassificationTask
from .image_prior import ImagePriorTask, InpaintingTask, SuperResolutionTask
from .segmentation import SegmentationTask

__all__ = [
    "ClassificationTask", "ImagePriorTask", "InpaintingTask", "SegmentationTask", "SuperResolutionTask", "XConvTask",
]
