"""Activation checkpointing (``xconv.checkpoint_modules``) on the main job's U-Net: bytes and step time.

Four networks, each a copy of one ``smp.Unet("resnet18")`` with 11 classes (the main job's
digit-texture scenes): plain torch; plain torch with ``--segments`` checkpointed; XConv at
``--probes`` with the 1-bit ReLU (the main job, ``run.py task=segmentation xconv.probes=8``);
and that XConv network with the same segments checkpointed. Per network: the bytes saved for
backward by one forward + the segmentation task's loss (cross-entropy + Dice;
``xconv.memory.saved_tensor_bytes``), the peak bytes of a training step on the CPU
(``xconv.memory.peak_tensor_bytes``: forward, loss, backward, Adam step; temporaries included)
and the time of a training step, the networks' steps interleaved in ``--rounds`` rounds after a
warm-up; the time ratio is the median over rounds of each round's ratio to plain torch's step.

Usage:
    python scripts/bench_checkpointing.py [--batch 16] [--size 64] [--probes 8] [--rounds 10]
                                          [--segments 'encoder.layer*' 'decoder.blocks.*'] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

import xconv
from xconv.memory import peak_tensor_bytes, saved_tensor_bytes

MIB = 2**20
CLASSES = 11
DICE = smp.losses.DiceLoss(smp.losses.MULTICLASS_MODE)


def _loss(net, x, y):
    logits = net(x)
    return F.cross_entropy(logits, y) + DICE(logits, y)


def networks(segments: list[str], probes: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = smp.Unet("resnet18", encoder_weights=None, classes=CLASSES).train()
    converted = xconv.convert(copy.deepcopy(plain), probes=probes)
    return {
        "plain torch": plain,
        "plain torch, checkpointed": xconv.checkpoint_modules(copy.deepcopy(plain), segments),
        f"XConv r={probes} + 1-bit ReLU": converted,
        f"XConv r={probes} + 1-bit ReLU, checkpointed": xconv.checkpoint_modules(copy.deepcopy(converted), segments),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--segments", nargs="+", default=["encoder.layer*", "decoder.blocks.*"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = networks(args.segments, args.probes)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, CLASSES, (args.batch, args.size, args.size))
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-3) for name, net in nets.items()}

    def step(name):
        optimizers[name].zero_grad(set_to_none=True)
        _loss(nets[name], x, y).backward()
        optimizers[name].step()

    for name in nets:
        step(name)  # warm-up: optimizer state, allocator
    rows = {name: {"saved": saved_tensor_bytes(_loss, net, x, y).total_bytes, "peak": peak_tensor_bytes(step, name),
                   "times": []} for name, net in nets.items()}
    for _ in range(args.rounds):
        for name in nets:
            start = time.perf_counter()
            step(name)
            rows[name]["times"].append(time.perf_counter() - start)
    base = rows["plain torch"]
    print(f"U-Net(resnet18), batch {args.batch}, 3x{args.size}x{args.size}, {args.threads} thread(s), "
          f"segments {args.segments}, {args.rounds} rounds")
    print("| network | saved MiB | vs plain | step peak MiB | vs plain | step s (median) | vs plain (median of rounds) |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        ratio = statistics.median(t / b for t, b in zip(row["times"], base["times"]))
        print(f"| {name} | {row['saved'] / MIB:.1f} | {row['saved'] / base['saved']:.3f} | {row['peak'] / MIB:.1f} | "
              f"{row['peak'] / base['peak']:.3f} | {statistics.median(row['times']):.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
