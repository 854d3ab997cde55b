"""Weight-gradient quality of XConv estimators on the real activations of a real network.

For every conv layer of a model (at initialisation) on a batch of natural-image crops from
scikit-image, the layer's real input ``X`` and real upstream gradient ``D`` are captured
from one exact backward pass. Each estimator configuration is then drawn ``--draws`` times
on that layer and compared with the exact weight gradient: relative error
``||g_hat - g|| / ||g||`` and cosine similarity (estimator.md, section 5). The table gives
the median over layers of the per-layer mean; the CSV has every layer.

Usage:
    python scripts/bench_gradient.py [--model unet|resnet18] [--probes 4 8 16 32]
                                     [--draws 8] [--csv results/bench/gradient_cpu.csv]
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torchvision
from skimage import data as skdata
from torch import nn

import xconv

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "coins", "camera", "hubble_deep_field")

# (label, estimator keyword arguments)
ESTIMATORS = [
    ("independent shared", dict(mode="independent")),
    ("independent per-sample", dict(mode="independent", per_sample=True)),
    ("independent rademacher", dict(mode="independent", distribution="rademacher")),
    ("multi", dict(mode="multi")),
    ("orthogonal", dict(mode="orthogonal")),
]


def natural_crops(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[batch, 3, size, size]`` random crops of scikit-image photos, standardised."""
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(batch):
        img = getattr(skdata, IMAGES[i % len(IMAGES)])()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        crops.append(torch.from_numpy(img[y:y + size, x:x + size].astype(np.float32) / 255).permute(2, 0, 1))
    x = torch.stack(crops)
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


def build(name: str, batch: int, size: int, device: str):
    """Model, input batch and a loss with a target derived from the images themselves."""
    x = natural_crops(batch, size).to(device)
    if name == "unet":
        model = smp.Unet("resnet18", encoder_weights=None, classes=1).to(device)
        target = (x.mean(1, keepdim=True) > 0).float()  # bright-region segmentation
        return model, x, lambda out: nn.functional.binary_cross_entropy_with_logits(out, target)
    model = torchvision.models.resnet18(num_classes=len(IMAGES)).to(device)
    labels = torch.arange(batch, device=device) % len(IMAGES)
    return model, x, lambda out: nn.functional.cross_entropy(out, labels)


def capture_layers(model: nn.Module, x: torch.Tensor, loss_fn):
    """``[(name, conv, X, D, exact dW)]`` for every conv, from one exact backward pass."""
    records, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad:
            def hook(m, args, out, name=name):
                records[name] = [m, args[0].detach()]
                out.register_hook(lambda d: records[name].append(d.detach()))
            handles.append(module.register_forward_hook(hook))
    loss_fn(model(x)).backward()
    for h in handles:
        h.remove()
    return [(name, m, inp, d, m.weight.grad.clone()) for name, (m, inp, d) in records.items()]


def draw_errors(conv: nn.Module, x: torch.Tensor, d: torch.Tensor, exact: torch.Tensor, options, draws: int):
    """Mean relative error and cosine of ``draws`` estimates; None where XConv is skipped."""
    layer = xconv.convert(copy.deepcopy(conv), relu=False, **options)
    if not layer.uses_estimator(x.requires_grad_(False)):
        return None
    errors, cosines = [], []
    for _ in range(draws):
        (g,) = torch.autograd.grad(layer(x), layer.weight, d)
        errors.append(((g - exact).norm() / exact.norm()).item())
        cosines.append(nn.functional.cosine_similarity(g.flatten(), exact.flatten(), dim=0).item())
    return statistics.fmean(errors), statistics.fmean(cosines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["unet", "resnet18"], default="unet")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--probes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--estimators", nargs="+", default=[e[0] for e in ESTIMATORS], choices=[e[0] for e in ESTIMATORS])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, x, loss_fn = build(args.model, args.batch, args.size, args.device)
    layers = capture_layers(model.train(), x, loss_fn)
    rows = []
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {len(layers)} conv layers, {args.draws} draws each")
    print("| estimator | r | layers | median rel. error | median cosine |")
    print("|---|---|---|---|---|")
    for label, options in ESTIMATORS:
        if label not in args.estimators:
            continue
        for r in args.probes:
            per_layer = []
            for name, conv, inp, d, exact in layers:
                result = draw_errors(conv, inp, d, exact, dict(options, probes=r), args.draws)
                if result is not None:
                    per_layer.append(result)
                    rows.append(dict(model=args.model, estimator=label, probes=r, layer=name,
                                     pixels=inp[0, 0].numel(), rel_error=result[0], cosine=result[1]))
            err = statistics.median(e for e, _ in per_layer)
            cos = statistics.median(c for _, c in per_layer)
            print(f"| {label} | {r} | {len(per_layer)} | {err:.2f} | {cos:.3f} |", flush=True)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
