"""Deep image prior (Ulyanov et al.): fit a randomly initialised network to one degraded image.

The network maps a fixed noise image to an image; training minimises the squared error between
the *degraded* output and the degraded observation, so the clean image is never seen and the
network's structure is the only prior. Super-resolution degrades by downscaling, inpainting by
masking. Validation scores the output against the clean image.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import save_image

from ..data.single_image import InpaintingDataModule, SuperResolutionDataModule
from ..degradations import downsample
from .base import XConvTask

# ITU-R BT.601 luma with studio swing (Y in [16, 235] of 255), as MATLAB's rgb2ycbcr and
# skimage.color.rgb2ycbcr compute it: the convention of published super-resolution PSNRs.
_Y_WEIGHTS = torch.tensor([65.481, 128.553, 24.966]) / 255
_Y_OFFSET = 16 / 255


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of RGB images in [0, 1], on the same scale.

    Shape: ``[B, 3, H, W]`` -> ``[B, 1, H, W]``, values in [16/255, 235/255].
    """
    weights = _Y_WEIGHTS.to(images)
    return (images * weights[:, None, None]).sum(dim=1, keepdim=True) + _Y_OFFSET


def _metrics(postfix: str = "") -> MetricCollection:
    return MetricCollection(
        {"psnr": PeakSignalNoiseRatio(data_range=1.0), "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)},
        prefix="val/", postfix=postfix,
    )


class ImagePriorTask(XConvTask):
    """Fit ``net`` (noise [1, C_in, H, W] -> image [1, 3, H, W] in [0, 1]) to one degraded image.

    Batches are dicts from :class:`experiments.data.single_image.SingleImageDataModule`. The loss
    is ``mse(degrade(net(noise + input_jitter * N(0, 1))), observed)``; ``input_jitter`` perturbs
    the noise afresh at every step (deep image prior's regulariser), validation uses the noise
    as it is. Subclasses define :meth:`degrade` and :meth:`baselines`, and may override :meth:`metric_view`.

    Validation logs PSNR and SSIM (torchmetrics, data range 1) of ``metric_view(output)`` against
    ``metric_view(clean)``: ``val/psnr``, ``val/ssim`` (the current, and after training the
    final, output); ``val/psnr_best`` (the highest ``val/psnr`` of any validation so far, the
    sanity check before training excepted; an oracle's choice, as it needs the clean image), with
    ``val/ssim_best`` and ``val/best_step`` at that validation; and for each trivial
    reconstruction ``name`` of :meth:`baselines`, ``val/psnr_<name>`` and ``val/ssim_<name>``.
    It writes PNGs into ``<trainer.default_root_dir>/images/``: ``clean.png``, ``observed.png``,
    ``<name>.png`` per baseline, once; ``final.png`` (the latest output) and ``best.png`` (the
    output of the best validation).

    Args:
        net: the generator, e.g. :class:`experiments.models.SkipNet`.
        optimizer, scheduler: partial optimizer and (optional) scheduler constructors, see :class:`XConvTask`.
        input_jitter: standard deviation of the per-step perturbation of the noise input; 0 for none.
        metric: the headline metric's name and mode; None: ``val/psnr``, higher is better (see :class:`XConvTask`).

    Raises:
        ValueError: ``input_jitter`` < 0.
    """

    metric_name = "val/psnr"
    baseline_names: tuple[str, ...] = ("baseline",)

    def __init__(
        self, net: nn.Module, optimizer: partial, scheduler: partial | None = None, input_jitter: float = 0.0,
        metric: Mapping | None = None,
    ):
        super().__init__(net, optimizer, scheduler, metric)
        if input_jitter < 0:
            raise ValueError(f"input_jitter: must be >= 0, got {input_jitter}")
        self.input_jitter = input_jitter
        self.val_metrics = _metrics()
        self.baseline_metrics = nn.ModuleDict({name: _metrics(f"_{name}") for name in self.baseline_names})
        # In buffers, so a resumed run (ckpt_path=) remembers its best validation. Not torchmetrics'
        # MaxMetric: the SSIM, step and output image at the best PSNR go with it.
        self.register_buffer("best_psnr", torch.tensor(float("-inf")))
        self.register_buffer("best_ssim", torch.tensor(float("nan")))
        self.register_buffer("best_step", torch.tensor(-1))
        self._output: torch.Tensor | None = None

    def degrade(self, images: torch.Tensor, batch: dict) -> torch.Tensor:
        """The observation operator on ``images`` [B, 3, H, W]: ``batch["observed"]`` is its value on the clean image."""
        raise NotImplementedError

    def metric_view(self, images: torch.Tensor) -> torch.Tensor:
        """What PSNR and SSIM compare, from ``images`` [B, 3, H, W]: the whole RGB image unless overridden."""
        return images

    def check_data(self, datamodule) -> None:
        """Also raise ValueError when the network cannot take the image's size (too small for its scales)."""
        super().check_data(datamodule)
        if hasattr(self.net, "check_input"):
            self.net.check_input(*datamodule.train_sample["noise"].shape[-2:])

    def baselines(self, batch: dict) -> dict[str, torch.Tensor]:
        """Trivial reconstructions [B, 3, H, W] from the observation, one per name in :attr:`baseline_names`."""
        raise NotImplementedError

    def loss(self, batch: dict, net: nn.Module | None = None) -> torch.Tensor:
        noise = batch["noise"]
        if self.input_jitter:
            noise = noise + self.input_jitter * torch.randn_like(noise)
        return F.mse_loss(self.degrade((net or self.net)(noise), batch), batch["observed"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        output = self.net(batch["noise"])
        target = self.metric_view(batch["clean"])
        self.val_metrics.update(self.metric_view(output), target)
        baselines = self.baselines(batch)
        for name, image in baselines.items():
            self.baseline_metrics[name].update(self.metric_view(image), target)
        self._output = output
        if batch_idx == 0 and not (self.image_dir / "clean.png").exists():
            for name, image in {"clean": batch["clean"], "observed": batch["observed"], **baselines}.items():
                self._save(image, name)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(scores, prog_bar=True)
        for metrics in self.baseline_metrics.values():
            self.log_dict(metrics.compute())
            metrics.reset()
        self._save(self._output, "final")
        # The sanity check before training scores the untrained network: not an iteration of the fit.
        if not self.trainer.sanity_checking and scores["val/psnr"] > self.best_psnr:
            self.best_psnr.copy_(scores["val/psnr"])
            self.best_ssim.copy_(scores["val/ssim"])
            self.best_step.fill_(self.global_step)
            self._save(self._output, "best")
        self.log_dict({"val/psnr_best": self.best_psnr, "val/ssim_best": self.best_ssim,
                       "val/best_step": self.best_step.float()})

    @property
    def image_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "images"

    def _save(self, images: torch.Tensor, name: str) -> None:
        self.image_dir.mkdir(parents=True, exist_ok=True)
        save_image(images, self.image_dir / f"{name}.png")


class SuperResolutionTask(ImagePriorTask):
    """Deep-image-prior super-resolution by an integer ``scale``: the loss compares :func:`downsample` of the output.

    Batches: ``noise`` [1, C_in, H, W], ``observed`` [1, 3, H/scale, W/scale] (and ``clean``
    [1, 3, H, W] in validation). PSNR and SSIM are measured on the luma (:func:`rgb_to_y`) with
    ``scale`` pixels cropped from every border, the usual super-resolution protocol; the
    baseline is bicubic upscaling of the observation (``val/psnr_baseline``).

    Raises:
        ValueError: ``scale`` < 1, and see :class:`ImagePriorTask`.

    Example:
        >>> from experiments.models import SkipNet
        >>> task = SuperResolutionTask(SkipNet(8, channels=[8, 8]), partial(torch.optim.Adam, lr=0.01), scale=4)
        >>> batch = {"noise": torch.rand(1, 8, 32, 32), "observed": torch.rand(1, 3, 8, 8)}
        >>> task.loss(batch).shape
        torch.Size([])
    """

    datamodule_type = SuperResolutionDataModule

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        scale: int,
        scheduler: partial | None = None,
        input_jitter: float = 0.0,
        metric: Mapping | None = None,
    ):
        if scale < 1:
            raise ValueError(f"scale: must be >= 1, got {scale}")
        super().__init__(net, optimizer, scheduler, input_jitter, metric)
        self.scale = scale

    def degrade(self, images: torch.Tensor, batch: dict) -> torch.Tensor:
        return downsample(images, self.scale)

    def metric_view(self, images: torch.Tensor) -> torch.Tensor:
        s = self.scale
        return rgb_to_y(images)[..., s:-s, s:-s]

    def baselines(self, batch: dict) -> dict[str, torch.Tensor]:
        upscaled = F.interpolate(batch["observed"], size=batch["noise"].shape[-2:], mode="bicubic", antialias=True)
        return {"baseline": upscaled.clamp(0, 1)}


class InpaintingTask(ImagePriorTask):
    """Deep-image-prior inpainting: the loss compares the output on the known pixels (``mask`` 1) only.

    Batches: ``noise`` [1, C_in, H, W], ``observed`` [1, 3, H, W] (0 in holes), ``mask``
    [1, 1, H, W] (and ``clean`` in validation). PSNR and SSIM are on the whole RGB image. Two
    baselines: the observation itself, holes black (``val/psnr_baseline``), and the holes
    filled with the mean colour of the known pixels (``val/psnr_mean_fill``).

    Example:
        >>> from experiments.models import SkipNet
        >>> task = InpaintingTask(SkipNet(8, channels=[8, 8]), partial(torch.optim.Adam, lr=0.01))
        >>> mask = (torch.rand(1, 1, 32, 32) > 0.5).float()
        >>> batch = {"noise": torch.rand(1, 8, 32, 32), "observed": torch.rand(1, 3, 32, 32) * mask, "mask": mask}
        >>> task.loss(batch).shape
        torch.Size([])
    """

    baseline_names = ("baseline", "mean_fill")
    datamodule_type = InpaintingDataModule

    def degrade(self, images: torch.Tensor, batch: dict) -> torch.Tensor:
        return images * batch["mask"]

    def baselines(self, batch: dict) -> dict[str, torch.Tensor]:
        observed, mask = batch["observed"], batch["mask"]
        mean = observed.sum(dim=(-2, -1), keepdim=True) / mask.sum(dim=(-2, -1), keepdim=True).clamp(min=1)
        return {"baseline": observed, "mean_fill": observed + (1 - mask) * mean}
