"""Activation memory of exact vs XConv training steps: saved-for-backward bytes (and CUDA peak).

Prints a table per model: exact, then XConv at each r with and without the 1-bit ReLU, SR low-bit
storage of conv and BatchNorm inputs at 8/4/2 bits, and the per-layer planner at 0.5x and 0.25x;
activation bytes are the deduplicated bytes of tensors saved for backward by one forward +
loss (``xconv.memory.saved_tensor_bytes``), measured in this process against the exact
model. It adds the peak memory of a whole training step (forward, loss, backward, SGD step),
the second step after a warm-up: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the
peak bytes of tensors created during the step and alive at once
(``xconv.memory.peak_tensor_bytes``: parameters excluded, temporaries included). ``--budget-gb G`` adds the largest batch that fits G GiB of
activations for each row (bytes are linear in batch: measured at two batch sizes, solved).

Usage:
    python scripts/bench_memory.py [--probes 4 8 16 32] [--models unet resnet18]
                                   [--budget-gb 16] [--csv results/bench/memory.csv]
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torchvision
from torch import nn

import xconv
from benchlib import write_csv
from xconv.memory import cuda_peak_memory_bytes, peak_tensor_bytes, saved_tensor_bytes

MIB = 2**20


def unet():
    return smp.Unet("resnet18", encoder_weights=None, classes=2), (8, 3, 256, 256)


def resnet18():
    return torchvision.models.resnet18(num_classes=10), (128, 3, 32, 32)


MODELS = {"unet": unet, "resnet18": resnet18}


def _loss(model, x):
    out = model(x)
    return out.float().square().mean()


def activation_bytes(model: nn.Module, shape) -> int:
    x = torch.randn(shape, device=next(model.parameters()).device)
    return saved_tensor_bytes(_loss, model, x, model=model).total_bytes


def _train_step(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        _loss(model, x).backward()
        opt.step()

    return step


def step_peak(model: nn.Module, shape, device: str) -> int:
    """Peak bytes of a training step of ``model`` (see the module docstring)."""
    step = _train_step(model, torch.randn(shape, device=device))
    step()  # warm-up: allocator, cuDNN plans, optimizer state
    if device.startswith("cuda"):
        return cuda_peak_memory_bytes(step)
    return peak_tensor_bytes(step)


# SR storage of the convs' and BatchNorms' inputs at these bits, with offset max-pools and the 1-bit ReLU.
STORAGE_BITS = (8, 4, 2)
# Budgets of the per-layer planner (fractions of plain torch's bytes), with BatchNorms at 4 bits.
PLANNER_BUDGETS = (0.5, 0.25)


def variants(probes_list):
    """``(label, convert options, planner budget)`` of every row."""
    yield "exact", None, None
    for r in probes_list:
        yield f"xconv r={r}", dict(probes=r, relu="exact"), None
        yield f"xconv r={r} + BitReLU", dict(probes=r, relu="bit"), None
    for bits in STORAGE_BITS:
        yield (f"SR {bits}-bit convs + BN, pool offsets, BitReLU",
               dict(storage="quantized", bits=bits, batchnorm_bits=bits, maxpool=True), None)
    for budget in PLANNER_BUDGETS:
        yield f"planner {budget}x (BN 4-bit, pool offsets, BitReLU)", dict(batchnorm_bits=4, maxpool=True), budget


def measure(name: str, probes_list, budget_gb: float | None, device: str):
    base, shape = MODELS[name]()
    base = base.to(device).train()
    rows = []
    for label, options, budget in variants(probes_list):
        model = copy.deepcopy(base)
        if options is not None:
            xconv.convert(model, **options)
        if budget is not None:
            batch = torch.randn(shape, device=device)
            xconv.plan_storage(model, _loss, batch, budget=budget).apply(model)
        act = activation_bytes(model, shape)
        row = dict(model=name, variant=label, batch=shape[0], activation_bytes=act,
                   peak_bytes=step_peak(model, shape, device))
        if budget_gb is not None:
            half = (max(1, shape[0] // 2),) + tuple(shape[1:])
            per_sample = (act - activation_bytes(model, half)) / (shape[0] - half[0])
            fixed = act - per_sample * shape[0]
            row["max_batch"] = int((budget_gb * 2**30 - fixed) // per_sample)
        rows.append(row)
    exact = rows[0]
    for row in rows:
        row["ratio"] = row["activation_bytes"] / exact["activation_bytes"]
        row["peak_ratio"] = row["peak_bytes"] / exact["peak_bytes"]
    return rows


def print_table(rows):
    cols = ["model", "variant", "batch", "activation MiB", "ratio", "step peak MiB", "peak ratio"]
    if "max_batch" in rows[0]:
        cols.append("max batch")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r["model"], r["variant"], str(r["batch"]), f"{r['activation_bytes'] / MIB:.1f}", f"{r['ratio']:.3f}",
                 f"{r['peak_bytes'] / MIB:.1f}", f"{r['peak_ratio']:.3f}"]
        if "max_batch" in r:
            cells.append(str(r["max_batch"]))
        print("| " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["unet", "resnet18"])
    parser.add_argument("--budget-gb", type=float, default=None, help="activation budget in GiB for the batch planner")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    rows = [row for name in args.models for row in measure(name, args.probes, args.budget_gb, args.device)]
    print_table(rows)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
