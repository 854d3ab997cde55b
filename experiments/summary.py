"""The run summary (``summary.json``): what every run records, built in one place."""
from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.plugins.precision import Precision
from omegaconf import DictConfig, OmegaConf

import xconv
from xconv.memory import cuda_peak_memory_bytes, saved_tensor_bytes

from .callbacks import TrainThroughput
from .config import checkpointing_patterns
from .tasks.base import XConvTask

REPO_ROOT = Path(__file__).resolve().parents[1]


def summary_callbacks() -> list[L.Callback]:
    """The callbacks :func:`build_summary` reads; attach them to the Trainer of every run."""
    return [Timer(), TrainThroughput()]


def _callback(trainer: L.Trainer, cls: type) -> L.Callback:
    return next(cb for cb in trainer.callbacks if isinstance(cb, cls))


def git_commit() -> str | None:
    """The checked-out commit of this repository, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def activation_memory(task: XConvTask, batch, device: torch.device, precision: Precision | None = None) -> dict:
    """Saved-for-backward bytes of one training forward + loss on ``batch``, converted vs plain torch.

    Both networks are deep copies, so measuring touches neither the trained weights nor
    BatchNorm statistics. Also the CUDA peak of a full training step (forward, loss,
    backward) of the converted network, None off CUDA. ``precision`` is the run's Lightning
    precision plugin: the batch is converted and the forward runs as in training (autocast for
    ``bf16-mixed``, float64 inputs for ``64-true``), so the bytes are those of the run's dtypes.
    Checkpointed segments (``checkpointing``) count their inputs only, as they keep nothing else
    between forward and backward; the plain-torch copy is checkpointed nowhere.
    """
    precision = precision or Precision()
    converted = copy.deepcopy(task.net).to(device).train()
    plain = xconv.revert(xconv.remove_checkpointing(copy.deepcopy(task.net))).to(device).train()
    batch = precision.convert_input(move_data_to_device(batch, device))
    with torch.enable_grad(), precision.forward_context():
        activation = saved_tensor_bytes(task.loss, batch, net=converted).total_bytes
        exact = saved_tensor_bytes(task.loss, batch, net=plain).total_bytes
        peak = cuda_peak_memory_bytes(lambda: task.loss(batch, net=converted).backward(), device=device)
    return {"activation_bytes": activation, "activation_bytes_exact": exact, "peak_memory_bytes": peak}


def build_summary(
    cfg: DictConfig, trainer: L.Trainer, task: XConvTask, datamodule: L.LightningDataModule, metrics: dict,
    commit: str | None,
) -> dict:
    """Everything a run records.

    ``metrics`` are the final metrics (``trainer.validate``, and ``trainer.test`` where there is
    a test split); ``commit`` the :func:`git_commit` taken when the run started, since the
    checkout may move on while a long run trains.
    """
    timer, throughput = _callback(trainer, Timer), _callback(trainer, TrainThroughput)
    device = trainer.strategy.root_device
    memory = activation_memory(task, next(iter(datamodule.train_dataloader())), device, trainer.precision_plugin)
    return {
        "task": cfg.task_name,
        **OmegaConf.to_container(cfg.xconv, resolve=True),  # every xconv option, at top level
        "checkpointing": checkpointing_patterns(cfg),
        "checkpointed_modules": len(xconv.checkpointed_module_names(task.net)),
        "storage_plan": plan.to_dict() if (plan := getattr(task, "storage_plan", None)) else None,
        "metric_name": task.metric_name,
        "metric": metrics.get(task.metric_name),
        "metrics": {**metrics, **task.summary_metrics()},
        **memory,
        "train_time_s": timer.time_elapsed("train"),
        "samples_per_s": throughput.samples_per_s,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "device": str(device),
        "precision": trainer.precision,
        "world_size": trainer.world_size,
        "seed": cfg.seed,
        "git_commit": commit,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_summary(summary: dict, path: str | Path) -> Path:
    """Write ``summary`` as JSON atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
