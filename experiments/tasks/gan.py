"""Image generation with a GAN, scored by the Fréchet distance (FID) of generated to real images."""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce_logits
from torchvision.utils import make_grid, save_image

from xconv._native import default_cache_dir

from .fid import check_fid_options, fid_metric
from .base import XConvTask

# The fixed latent codes of the sample grid come from this seed, so grids of different epochs
# (and runs) show the same codes.
SAMPLE_SEED = 1234


class GANTask(XConvTask):
    """Train a GAN ``net = {"generator": G, "discriminator": D}`` (an ``nn.ModuleDict``) with the non-saturating loss.

    ``G``: latent codes [B, G.latent_dim] -> images [B, C, H, W] in [-1, 1]; ``D``: images
    [B, C, H, W] -> logits [B]. Batches are images [B, C, H, W] in [0, 1], or tuples whose first
    element they are (labels are ignored). Each training step updates D once, then G once
    (DCGAN's alternation), with two optimizers built by ``optimizer`` (D's first), so
    ``trainer.global_step`` counts two steps per batch.

    Validation logs ``val/fid`` (lower is better: 0 when the feature statistics of generated
    and real images coincide): the FID between the validation images and as many generated
    ones, from latent codes fixed per validation batch, so that epochs differ only by the
    generator. The features are Inception-v3's or a classifier's trained on the training data
    (see :mod:`experiments.tasks.fid`; ``fid_feature``), set up when training starts;
    :attr:`fid_feature` says which. Each validation epoch also saves an 8x8 grid of samples
    (fixed codes) to ``<trainer.default_root_dir>/samples/step<global step>.png`` and logs it
    to W&B under ``val/samples`` when a ``WandbLogger`` is attached.

    Args:
        net: the GAN pair; ``xconv.convert`` patterns pick either part (``generator.*``).
        optimizer: a partially-applied optimizer class, called once for D and once for G.
        fid_feature: ``"auto"`` (Inception if it loads, else the classifier), ``"inception"``
            or ``"classifier"``.
        fid_cache_dir: where the feature classifier is cached; None: ``~/.cache/xconv``
            (``$XDG_CACHE_HOME/xconv``).
        fid_classifier_steps: training batches of the feature classifier.
        metric: the headline metric's name and mode; None: ``val/fid``, lower is better (see :class:`XConvTask`).

    Raises:
        ValueError: ``net`` lacks a ``generator`` or ``discriminator`` or its generator has no
            ``latent_dim``; a bad ``fid_feature`` or ``fid_classifier_steps``.

    Example:
        >>> from experiments.models import dcgan
        >>> task = GANTask(dcgan(image_size=16, latent_dim=8), optimizer=partial(torch.optim.Adam, lr=2e-4))
        >>> task.loss(torch.rand(4, 1, 16, 16)).shape
        torch.Size([])
    """

    metric_name = "val/fid"
    metric_mode = "min"
    # D's update backpropagates through D only (G's output is detached), so under DDP the
    # generator's parameters get no gradient in that pass: run.py asks for
    # trainer.strategy=ddp_find_unused_parameters_true.
    ddp_unused_parameters = True

    def __init__(
        self,
        net: nn.ModuleDict,
        optimizer: partial,
        fid_feature: str = "auto",
        fid_cache_dir: str | None = None,
        fid_classifier_steps: int = 500,
        metric: Mapping | None = None,
    ):
        super().__init__(net, optimizer, metric=metric)
        net = self.net
        missing = {"generator", "discriminator"} - set(net.keys() if isinstance(net, nn.ModuleDict) else ())
        if missing:
            raise ValueError(
                f"net: needs an nn.ModuleDict with 'generator' and 'discriminator', missing {sorted(missing)}"
            )
        if not isinstance(getattr(net["generator"], "latent_dim", None), int):
            raise ValueError("net: the generator needs an int attribute latent_dim (the size of its latent codes)")
        check_fid_options(fid_feature, fid_classifier_steps)
        self.fid_options = (fid_feature, fid_cache_dir or default_cache_dir(), fid_classifier_steps)
        self.automatic_optimization = False
        # The metric is kept out of the module tree (a plain dict), so that checkpoints do not
        # carry its feature network (Inception-v3 alone is 100 MB) and load without it.
        self._metrics: dict = {}
        self.fid_feature: str | None = None  # "inception" or "classifier", once set up

    @property
    def generator(self) -> nn.Module:
        return self.net["generator"]

    @property
    def discriminator(self) -> nn.Module:
        return self.net["discriminator"]

    @staticmethod
    def _images(batch) -> torch.Tensor:
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def _noise(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent codes [n, latent_dim] ~ N(0, 1) on ``device``; drawn on the CPU from ``generator`` if given."""
        size = (n, self.generator.latent_dim)
        if generator is None:
            return torch.randn(size, device=device)
        return torch.randn(size, generator=generator).to(device)

    def loss(self, batch, net: nn.Module | None = None) -> torch.Tensor:
        """D's loss on the batch and on fakes plus G's loss on the same fakes, from one forward of G and of D on each.

        Its graph holds what a training step's two updates keep for backward together: G's
        activations and D's on real and on fake images.
        """
        net = net or self.net
        real = self._images(batch) * 2 - 1
        logits_real = net["discriminator"](real)
        # The batch's device, not this module's: the run summary calls this with a copy of the
        # network on the training device after Lightning has moved the module back to the CPU.
        logits_fake = net["discriminator"](net["generator"](self._noise(len(real), real.device)))
        return (
            bce_logits(logits_real, torch.ones_like(logits_real))
            + bce_logits(logits_fake, torch.zeros_like(logits_fake))
            + bce_logits(logits_fake, torch.ones_like(logits_fake))
        )

    def training_step(self, batch, batch_idx: int) -> None:
        real = self._images(batch) * 2 - 1
        opt_d, opt_g = self.optimizers()
        fake = self.generator(self._noise(len(real), real.device))

        logits_real, logits_fake = self.discriminator(real), self.discriminator(fake.detach())
        loss_d = (bce_logits(logits_real, torch.ones_like(logits_real))
                  + bce_logits(logits_fake, torch.zeros_like(logits_fake)))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

        # Non-saturating generator loss, through the discriminator just updated.
        logits_fake = self.discriminator(fake)
        loss_g = bce_logits(logits_fake, torch.ones_like(logits_fake))
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.log_dict({"train/loss_d": loss_d, "train/loss_g": loss_g}, prog_bar=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer_factory(params=self.discriminator.parameters()),
                self.optimizer_factory(params=self.generator.parameters())]

    def setup(self, stage: str) -> None:
        if "fid" not in self._metrics:
            feature, cache_dir, steps = self.fid_options
            self._metrics["fid"], self.fid_feature = fid_metric(feature, self.trainer.datamodule, cache_dir, steps)

    def on_validation_epoch_start(self) -> None:
        self._metrics["fid"].to(self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        real = self._images(batch)
        codes = self._noise(len(real), real.device, torch.Generator().manual_seed(batch_idx))
        fid = self._metrics["fid"]
        fid.update(real, real=True)
        fid.update((self.generator(codes) + 1) / 2, real=False)

    def on_validation_epoch_end(self) -> None:
        fid = self._metrics["fid"]
        self.log("val/fid", fid.compute(), prog_bar=True)
        fid.reset()
        if not self.trainer.sanity_checking:
            self.save_samples()

    def save_samples(self) -> Path:
        """Save (and log to W&B) an 8x8 grid of samples from fixed latent codes; return the PNG's path."""
        images = (self.generator(self._noise(64, self.device, torch.Generator().manual_seed(SAMPLE_SEED))) + 1) / 2
        path = Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(images, nrow=8), path)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/samples", [str(path)], step=self.global_step)
        return path

    def summary_metrics(self) -> dict:
        return {"fid_feature": self.fid_feature}
