"""What ``run.py`` and the run summary need from every task."""
from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from xconv.lightning import XConvCallback


def rank_seed(seed: int, rank: int) -> int:
    """A seed for process ``rank`` of a distributed run seeded with ``seed``.

    numpy's ``SeedSequence`` hashes both numbers, so runs of a seed sweep do not share streams,
    as they would with ``seed + rank`` (seed 0 rank 1 = seed 1 rank 0).

    >>> rank_seed(0, 1) == rank_seed(0, 1) != rank_seed(0, 0)
    True
    """
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0])


def _is_config(value) -> bool:
    """Whether ``value`` is a Hydra config of an object (a mapping with ``_target_``) rather than the object."""
    return isinstance(value, Mapping) or OmegaConf.is_dict(value)


def _check_metric(metric: Mapping) -> tuple[str, str]:
    """``metric``'s name and mode; ValueError naming the key (``metric.mode: ...``) where one is missing or bad."""
    if set(metric) != {"name", "mode"}:
        raise ValueError(f"metric: needs exactly the keys name and mode, got {sorted(metric)}")
    name, mode = metric["name"], metric["mode"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric.name: must be a logged metric's key, e.g. val/acc, got {name!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"metric.mode: must be 'min' or 'max' (lower or higher is better), got {mode!r}")
    return name, mode


def _build(argument: str, config: Mapping):
    """``instantiate(config)``; a constructor's complaint becomes one naming ``argument`` first
    (``net.channels: ...``, ``net: Wrong encoder name ...``), as ``experiments.build`` names config keys.

    Raises:
        ValueError: the constructor's ValueError, TypeError, FileNotFoundError or KeyError, reworded so.
    """
    try:
        return instantiate(config)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, KeyError):  # e.g. smp's unknown encoder name
            raise ValueError(f"{argument}: {cause.args[0]}") from cause
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            raise ValueError(f"{argument}.{cause}") from cause
        raise


class XConvTask(L.LightningModule):
    """A LightningModule whose network ``net`` is what :class:`xconv.lightning.XConvCallback` converts (``modules="net"``).

    Subclasses set :attr:`metric_name` (a key they log during validation, the run's headline
    number) and, where lower is better, :attr:`metric_mode` (``"min"``; default ``"max"``), and
    implement :meth:`loss`. ``metric`` (``{"name": ..., "mode": ...}``, the task config's
    ``task.metric``) replaces both for one task (ValueError where a key is missing or bad); without
    it (a task built in Python) the class's own apply. ``optimizer`` is a partially-applied optimizer
    constructor (Hydra's ``_partial_: true``) that receives the parameters; ``scheduler``, if
    given, a partially-applied ``torch.optim.lr_scheduler`` class that receives the optimizer and
    steps once per epoch (e.g. ``CosineAnnealingLR`` with ``T_max`` = the number of epochs).
    Subclasses whose batches only one data module makes name it in :attr:`datamodule_type`.

    ``net``, ``optimizer`` and ``scheduler`` may also be given as their Hydra configs (mappings
    with ``_target_``, as ``run.py`` does): they are built here, and kept as plain data in the
    hyperparameters (``save_hyperparameters``), so that ``Task.load_from_checkpoint(path)``
    rebuilds the task, its XConv layers included (:meth:`on_load_checkpoint`). Arguments given
    as objects are left out of the hyperparameters: pass them again to ``load_from_checkpoint``.
    """

    metric_name: str
    metric_mode: str = "max"
    datamodule_type: type | None = None

    def __init__(self, net: nn.Module | Mapping, optimizer: partial | Mapping,
                 scheduler: partial | Mapping | None = None, metric: Mapping | None = None):
        super().__init__()
        if metric is not None:  # kept in the hyperparameters (below), so load_from_checkpoint restores it
            self.metric_name, self.metric_mode = _check_metric(metric)
        built = {"net": net, "optimizer": optimizer, "scheduler": scheduler}
        # The subclasses' arguments too (Lightning collects every __init__ frame of this object).
        self.save_hyperparameters(ignore=[k for k, v in built.items() if v is not None and not _is_config(v)],
                                  logger=False)  # run.py logs the whole run config
        for key, value in self.hparams.items():  # plain data: checkpoints load with torch.load(weights_only=True)
            if OmegaConf.is_config(value):
                self.hparams[key] = OmegaConf.to_container(value, resolve=True)
        net, optimizer, scheduler = (_build(k, v) if _is_config(v) else v for k, v in built.items())
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Raise ValueError, naming the config key, when ``datamodule`` cannot feed this task;
        ``run.py`` calls it before training."""
        if self.datamodule_type is not None and not isinstance(datamodule, self.datamodule_type):
            raise ValueError(f"data: needs data of type {self.datamodule_type.__name__}, got "
                             f"{type(datamodule).__name__} (leave data= at the task's default)")

    def loss(self, batch, net: nn.Module | None = None) -> torch.Tensor:
        """The training loss of ``batch`` through ``net`` (default ``self.net``): one forward + loss.

        Taking the network as an argument lets the run summary measure the activation memory of
        the converted network and of a plain-torch copy on the same batch.
        """
        raise NotImplementedError

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Convert :attr:`net` as the run that saved ``checkpoint`` did, before its weights load."""
        XConvCallback.restore(self, checkpoint)

    def summary_metrics(self) -> dict:
        """Final metrics that ``self.log`` cannot carry (e.g. strings); the run summary adds them to its ``metrics``."""
        return {}

    def on_fit_start(self) -> None:
        """In a distributed run, reseed torch's default generator per rank, from (run seed, global rank).

        XConv layers derive their probe seeds from that generator (``xconv.rng.draw_seed``), and
        every rank was seeded alike (``seed_everything`` in each process): without this, all ranks
        would draw the same probes, their weight-gradient errors would be identical, and DDP's
        gradient average would not reduce them. Here, after the model is wrapped (DDP has already
        broadcast rank 0's parameters) and before the first step, each rank gets its own stream,
        reproducible from the seed and the rank. The run seed is ``seed_everything``'s, which
        Lightning passes to every process as ``PL_GLOBAL_SEED`` (without it, the seed torch was
        last seeded with). A single-process run is left untouched: it stays bit for bit what it was.
        """
        if self.trainer.world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            torch.manual_seed(rank_seed(seed, self.trainer.global_rank))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
