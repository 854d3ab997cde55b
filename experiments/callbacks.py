"""Callbacks that every run attaches for its summary."""
from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size


class TrainThroughput(L.Callback):
    """Counts training samples and the wall-clock spent inside training steps.

    A step spans forward, backward and optimizer update (``on_train_batch_start`` to
    ``on_train_batch_end``), so validation and data loading between steps are not counted:
    ``samples / step_time_s`` is the training throughput XConv changes. The counts are saved
    in checkpoints, so a resumed run (``ckpt_path=``) continues them: like ``train_time_s``
    (Lightning's ``Timer``, also saved), they cover the first run and every resumption.

    Not Lightning's ``ThroughputMonitor``: it times from one batch end to the next, data loading
    included, asks the module for FLOPs, logs a rolling window rather than a run total, and
    does not save its counts in checkpoints.
    """

    def __init__(self):
        self.samples = 0
        self.step_time_s = 0.0
        self._start = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        # CUDA kernels run asynchronously; without a sync the clock would stop before the step ends.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.step_time_s += time.perf_counter() - self._start
        self.samples += extract_batch_size(batch)

    def state_dict(self) -> dict:
        return {"samples": self.samples, "step_time_s": self.step_time_s}

    def load_state_dict(self, state_dict: dict) -> None:
        self.samples, self.step_time_s = state_dict["samples"], state_dict["step_time_s"]

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.step_time_s if self.step_time_s > 0 else None
