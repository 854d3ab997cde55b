"""Error of SR low-bit storage against its group size, on the conv inputs of a U-Net on natural crops.

For every conv input of ``smp.Unet("resnet18")`` (batch 4 of 128x128 crops of scikit-image
photographs, at initialisation), the rounding variance of each element at ``bits`` bits
(:func:`xconv.quantize.rounding_variance`, exact, no draws) relative to the input's energy,
``sum Var / sum x^2``, for groups of 16 to 256 elements. Groups cost 32 bits of offset and
scale each, so the table also gives the stored bits per element: the group size trades the
two. Prints the median over layers.

Usage:
    python scripts/bench_group_size.py [--bits 2 4 8] [--groups 16 32 64 128 256]
"""
from __future__ import annotations

import argparse
import statistics

import segmentation_models_pytorch as smp
import torch
from torch import nn

import xconv.quantize as quantize
from gradient_quality import natural_crops


def conv_inputs(batch: int = 4, size: int = 128) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).train()
    inputs = []
    hooks = [m.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(natural_crops(batch, size))
    for hook in hooks:
        hook.remove()
    return inputs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--groups", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    args = parser.parse_args(argv)
    inputs = conv_inputs()
    default = quantize.GROUP_SIZE
    print("| bits | group | stored bits / element | median relative variance |")
    print("|---|---|---|---|")
    try:
        for bits in args.bits:
            for group in args.groups:
                quantize.GROUP_SIZE = group  # read by the grouping at call time
                ratios = [(quantize.rounding_variance(x, bits).sum() / x.square().sum()).item() for x in inputs]
                print(f"| {bits} | {group} | {bits + 32 / group:.2f} | {statistics.median(ratios):.2e} |", flush=True)
    finally:
        quantize.GROUP_SIZE = default


if __name__ == "__main__":
    main()
