"""The equal-memory protocol: each method trains at the batch size whose activation bytes match one budget.

A reviewer compares memory-saving methods at the same bytes: the budget is a fraction of what
plain torch keeps for one training step at a reference batch size, and every run (exact
training, checkpointing, the paper's sketch, SR storage, the planner) takes the batch size whose
activation bytes (``experiments.summary.activation_memory``, ``summary.json``'s
``activation_bytes``) come nearest to it. With half the bytes of the reference batch, exact
training is "exact at half batch"; a method that keeps a quarter of plain torch's bytes trains
on twice the reference batch.
The paper's CIFAR-10 comparison (exact at batch 128 against XConv at 256) is this protocol by hand.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision

import xconv.rng

from .summary import activation_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EqualMemory:
    """Where a run stands against its budget (all sizes in bytes), as ``summary.json`` records it.

    Attributes:
        fraction, reference_batch_size: the budget is ``fraction`` of plain torch's activation
            bytes at ``reference_batch_size``.
        budget_bytes: that budget.
        batch_size: the batch chosen: the one whose activation bytes come nearest the budget.
        activation_bytes: this run's bytes at ``batch_size`` (``activation_bytes / budget_bytes``
            is how closely it matches: within 5% once a sample is small against the budget).
    """

    fraction: float
    reference_batch_size: int
    budget_bytes: int
    batch_size: int
    activation_bytes: int

    def to_dict(self) -> dict:
        return {**self.__dict__, "ratio_to_budget": self.activation_bytes / self.budget_bytes}


def nearest_batch(measure: Callable[[int], int], budget: int, start: int, limit: int, smallest: int = 1) -> tuple[int, int]:
    """``(batch, bytes)``: the batch size in ``smallest .. limit`` whose ``measure(batch)`` (bytes) is nearest
    ``budget`` (of two equally near, the smaller), and its bytes. No batch below ``smallest`` is measured.

    Activation bytes grow with the batch by a constant per sample (plus a part that does not grow,
    e.g. a loss's scalars): the line through two measurements gives the guess, which is then
    checked and moved one sample at a time, so a handful of measurements find it.

    Raises:
        ValueError: ``budget`` < 1, or not ``1 <= smallest <= start <= limit``.
    """
    if budget < 1 or not 1 <= smallest <= start <= limit:
        raise ValueError(f"need budget >= 1 and 1 <= smallest <= start <= limit, got budget={budget}, "
                         f"smallest={smallest}, start={start}, limit={limit}")
    measured: dict[int, int] = {}

    def bytes_at(batch: int) -> int:
        if batch not in measured:
            measured[batch] = measure(batch)
        return measured[batch]

    other = start // 2 if start // 2 >= smallest else min(limit, 2 * start)
    if other == start:  # one batch size to measure: bytes taken as proportional to it
        per_sample, fixed = bytes_at(start) / start, 0.0
    else:
        per_sample = (bytes_at(start) - bytes_at(other)) / (start - other)
        fixed = bytes_at(start) - per_sample * start
    guess = int((budget - fixed) // per_sample) if per_sample > 0 else limit
    batch = min(limit, max(smallest, guess))
    while batch > smallest and bytes_at(batch) > budget:
        batch -= 1
    while batch < limit and bytes_at(batch + 1) <= budget:
        batch += 1
    # batch is now the largest that fits (or the smallest); the next may be nearer from above.
    if batch < limit and bytes_at(batch + 1) - budget < budget - bytes_at(batch):
        batch += 1
    return batch, bytes_at(batch)


def check_equal_memory(fraction, batch_size) -> None:
    """Raise a one-line ``ValueError`` naming ``equal_memory.fraction`` or ``equal_memory.batch_size``
    unless the first is a number in (0, 1] and the second an int >= 1."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"equal_memory.fraction must be a number in (0, 1], got {fraction!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"equal_memory.batch_size must be an int >= 1, got {batch_size!r}")


def check_matchable(datamodule: L.LightningDataModule, reference_batch_size: int) -> int:
    """Set up ``datamodule`` for fit and return its training set's size, the largest batch there is.

    Raises:
        ValueError: a data module without a ``batch_size`` attribute, or ``reference_batch_size``
            above the training set's size (one line each, naming the key).
    """
    if not hasattr(datamodule, "batch_size"):
        raise ValueError(f"equal_memory: {type(datamodule).__name__} has no batch_size to choose")
    datamodule.setup("fit")
    limit = len(datamodule.train_set)
    if reference_batch_size > limit:
        raise ValueError(f"equal_memory.batch_size must be at most the training set's {limit} samples, "
                         f"got {reference_batch_size}")
    return limit


def match_batch_size(task, datamodule: L.LightningDataModule, fraction: float, reference_batch_size: int,
                     device: torch.device | str = "cpu", precision: Precision | None = None) -> EqualMemory:
    """Set ``datamodule.batch_size`` to the batch whose activation bytes with ``task``'s (converted)
    network come nearest ``fraction`` of plain torch's at ``reference_batch_size``; return the record.

    Measured as ``summary.json`` measures (``activation_memory``: saved-for-backward bytes of one
    forward and loss on deep copies of the network, on ``device`` under the run's Lightning
    ``precision`` plugin), on the first training batch of each size tried, plain torch at the
    reference batch only, with torch's CPU generator and XConv's seed count restored afterwards, so
    the run draws what it would draw without the matching. Batches of one sample are not tried
    (BatchNorm cannot train on them; the training loaders drop such a last batch too). Where no
    batch comes within 5% of the budget (it lies below two samples' bytes, or above the whole
    training set's), a warning says so.

    Raises:
        ValueError: what :func:`check_equal_memory` and :func:`check_matchable` raise.
    """
    check_equal_memory(fraction, reference_batch_size)
    limit = check_matchable(datamodule, reference_batch_size)

    @functools.cache
    def memory(batch_size: int) -> dict:
        datamodule.batch_size = batch_size
        with torch.random.fork_rng(devices=[]), xconv.rng.replayed_draw_count(xconv.rng.draw_count()):
            batch = next(iter(datamodule.train_dataloader()))
            return activation_memory(task, batch, torch.device(device), precision, plain=batch_size == reference_batch_size)

    budget = int(fraction * memory(reference_batch_size)["activation_bytes_exact"])
    smallest = min(2, reference_batch_size)
    batch, activation = nearest_batch(lambda b: memory(b)["activation_bytes"], budget, reference_batch_size, limit,
                                      smallest)
    datamodule.batch_size = batch
    if abs(activation / budget - 1) > 0.05:
        log.warning("equal_memory: batch %d keeps %.2fx the budget of %d bytes (batches of %d to %d samples)",
                    batch, activation / budget, budget, smallest, limit)
    return EqualMemory(fraction, reference_batch_size, budget, batch, activation)
