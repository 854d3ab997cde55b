"""The run summary (``summary.json``): what every run records, built in one place."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.plugins.precision import Precision

import xconv
from xconv.lightning import XConvCallback
from xconv.memory import cuda_peak_memory_bytes, saved_tensor_bytes

from .callbacks import TrainThroughput
from .tasks.base import XConvTask

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def activation_memory(task: XConvTask, batch, device: torch.device, precision: Precision | None = None,
                      plain: bool = True) -> dict:
    """Saved-for-backward bytes of one training forward + loss on ``batch``, converted vs plain torch.

    Both networks are deep copies, so measuring touches neither the trained weights nor
    BatchNorm statistics. Also the CUDA peak of a full training step (forward, loss,
    backward) of the converted network, None off CUDA. ``precision`` is the run's Lightning
    precision plugin: the batch is converted and the forward runs as in training (autocast for
    ``bf16-mixed``, float64 inputs for ``64-true``), so the bytes are those of the run's dtypes.
    Checkpointed segments (``checkpointing``) count their inputs only, as they keep nothing else
    between forward and backward; the plain-torch copy is checkpointed nowhere. ``plain=False``
    measures the converted network's bytes only (the other two values are then None). Plain torch
    at this batch may not fit the device where the batch was chosen to fit a budget (the equal-memory
    protocol): ``activation_bytes_exact`` is then None, with a warning, rather than the run failing.
    """
    precision = precision or Precision()
    converted = copy.deepcopy(task.net).to(device).train()
    batch = precision.convert_input(move_data_to_device(batch, device))
    exact = peak = None
    with torch.enable_grad(), precision.forward_context():
        activation = saved_tensor_bytes(task.loss, batch, net=converted).total_bytes
        if plain:
            exact = _plain_torch_bytes(task, batch, device)
            peak = cuda_peak_memory_bytes(lambda: task.loss(batch, net=converted).backward(), device=device)
    return {"activation_bytes": activation, "activation_bytes_exact": exact, "peak_memory_bytes": peak}


def _plain_torch_bytes(task: XConvTask, batch, device: torch.device) -> int | None:
    """:func:`activation_memory`'s plain-torch bytes, or None where they do not fit ``device``."""
    try:
        plain_net = xconv.revert(xconv.remove_checkpointing(copy.deepcopy(task.net))).to(device).train()
        return saved_tensor_bytes(task.loss, batch, net=plain_net).total_bytes
    except torch.OutOfMemoryError:  # returning drops the frames that hold the partial graph
        log.warning("summary: plain torch's activations at the trained batch size do not fit %s; "
                    "activation_bytes_exact is recorded as None", device)
        return None


class RunSummary(L.Callback):
    """Writes a run's ``summary.json`` on global rank 0: after ``fit`` (timing, throughput, activation
    bytes converted vs plain torch, peak memory, git commit, the run config, which it also logs as
    hyperparameters when fit starts), then again after each
    later ``trainer.validate`` / ``trainer.test`` with the metrics they score (the final weights').

    Reads Lightning's :class:`~lightning.pytorch.callbacks.Timer`, :class:`TrainThroughput` and, where
    present, :class:`xconv.lightning.XConvCallback` from the Trainer: :func:`summary_callbacks` gives all
    but the last. ``config`` is the run's resolved config (``task_name``, ``seed``, ``xconv`` are read);
    the git commit is taken here, when the run starts, since the checkout may move on while it trains.
    ``equal_memory`` is the batch size matching of the equal-memory protocol
    (:class:`experiments.equal_memory.EqualMemory`, or None), recorded as is; ``batch_size`` is the data
    module's when training ended (the one matched, where the protocol chose it).
    """

    def __init__(self, path: str | Path, config: dict):
        self.path, self.config, self.commit = Path(path), config, git_commit()
        self.equal_memory = None  # set by experiments.build once the equal-memory protocol has matched the batch
        self.summary: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: XConvTask, stage: str) -> None:
        if stage == "fit":
            for logger in trainer.loggers:
                logger.log_hyperparams(self.config)

    def on_fit_end(self, trainer: L.Trainer, pl_module: XConvTask) -> None:
        if not trainer.is_global_zero:
            return
        timer, throughput = _callback(trainer, Timer), _callback(trainer, TrainThroughput)
        converter = next((cb for cb in trainer.callbacks if isinstance(cb, XConvCallback)), None)
        plan = converter.storage_plan if converter is not None else None
        device = trainer.strategy.root_device
        batch = next(iter(trainer.datamodule.train_dataloader()))
        self.summary = {
            "task": self.config["task_name"],
            **self.config["xconv"],  # every xconv option, at top level
            "checkpointing": converter.checkpointing if converter is not None else None,
            "checkpointed_modules": len(xconv.checkpointed_module_names(pl_module.net)),
            "storage_plan": plan.to_dict() if plan is not None else None,
            "metric_name": pl_module.metric_name,
            "metric_mode": pl_module.metric_mode,  # "max" or "min": which way make_tables.py ranks runs
            "metric": None,
            "metrics": pl_module.summary_metrics(),
            **activation_memory(pl_module, batch, device, trainer.precision_plugin),
            "batch_size": getattr(trainer.datamodule, "batch_size", None),  # the one trained with
            "equal_memory": self.equal_memory.to_dict() if self.equal_memory is not None else None,
            "train_time_s": timer.time_elapsed("train"),
            "samples_per_s": throughput.samples_per_s,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "device": str(device),
            "precision": trainer.precision,
            "world_size": trainer.world_size,
            "seed": self.config["seed"],
            "git_commit": self.commit,
            "config": self.config,
        }
        self._write(trainer)

    def _scored(self, trainer: L.Trainer, pl_module: XConvTask) -> None:
        """Add what a ``validate`` or ``test`` run after ``fit`` logged (Lightning returns the same numbers)."""
        if self.summary is None or not trainer.is_global_zero:
            return
        metrics = self.summary["metrics"]
        metrics |= {k: v.item() for k, v in trainer.callback_metrics.items() if k.partition("/")[0] in ("val", "test")}
        metrics |= pl_module.summary_metrics()
        self.summary["metric"] = metrics.get(pl_module.metric_name)
        self._write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: XConvTask) -> None:
        if trainer.state.fn == "validate":  # not the validation inside fit
            self._scored(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: XConvTask) -> None:
        self._scored(trainer, pl_module)

    def _write(self, trainer: L.Trainer) -> None:
        write_summary(self.summary, self.path)
        scalars = {k: v for k, v in self.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in trainer.loggers:
            logger.log_metrics({f"summary/{k}": v for k, v in scalars.items()}, step=trainer.global_step)


def summary_callbacks(path: str | Path, config: dict, max_time=None) -> list[L.Callback]:
    """The callbacks that measure and write a run's ``summary.json`` at ``path`` (see :class:`RunSummary`, the last).

    ``max_time`` is ``lightning.Trainer``'s: a Trainer given a ``Timer`` callback ignores its own
    ``max_time``, so the Timer here stops training at it (``"DD:HH:MM:SS"``, a ``timedelta`` or a dict)."""
    return [Timer(duration=max_time), TrainThroughput(), RunSummary(path, config)]


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
