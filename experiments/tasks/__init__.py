"""One LightningModule per task; each is selected by a ``configs/task/<name>.yaml``."""
from .base import XConvTask
from .classification import ClassificationTask
from .segmentation import SegmentationTask

__all__ = ["ClassificationTask", "SegmentationTask", "XConvTask"]
