"""Weight-gradient quality of XConv estimators on the real activations of a real network.

For every conv layer of a model (at initialisation, or after ``--train-steps`` exact Adam
steps on fresh crops) on a batch of natural-image crops from
scikit-image, the layer's real input ``X`` and real upstream gradient ``D`` are captured
from one exact backward pass. Each estimator configuration is then drawn ``--draws`` times
on that layer and compared with the exact weight gradient: relative error
``||g_hat - g|| / ||g||`` and cosine similarity (the paper's figures of merit). The table gives
the median over layers of the per-layer mean; the CSV has every layer. For deflated sketches
the table also gives the fraction of ``||X||^2`` the kept directions hold exactly.

With ``--age M`` it also computes the paper's average gradient error over ``M`` minibatches
of ``--batch`` crops, ``AGE = (1/M) sum_m ||g - g_m||^2`` (``g`` the exact full-data
gradient of all parameters, ``g_m`` the minibatch gradient, exact or XConv, gradients
zeroed between minibatches), next to the exact minibatch (SGD) AGE.

With ``--plot PNG`` it draws the median relative error, the median cosine and (with ``--age``)
AGE / SGD AGE against r, one line per estimator.

Usage:
    python scripts/gradient_quality.py [--model unet|resnet18] [--probes 4 8 16 32]
                                       [--draws 8] [--train-steps 0] [--age M]
                                       [--csv results/bench/gradient_cpu.csv] [--plot gradient.png]
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import matplotlib
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torchvision
from skimage import data as skdata
from torch import nn

import xconv
from xconv.functional import deflation_basis
from benchlib import write_csv

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "coins", "camera", "hubble_deep_field")

# (label, estimator keyword arguments)
ESTIMATORS = [
    ("independent shared", dict(mode="independent")),
    ("independent per-sample", dict(mode="independent", per_sample=True)),
    ("independent rademacher", dict(mode="independent", distribution="rademacher")),
    ("deflated dct", dict(mode="independent", deflation="dct")),
    ("deflated pca", dict(mode="independent", deflation="pca")),
    ("deflated dct k=r/2", dict(mode="independent", deflation="dct", rank_fraction=0.5)),
    ("deflated pca k=r/2", dict(mode="independent", deflation="pca", rank_fraction=0.5)),
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


def make_batch(name: str, batch: int, size: int, device: str, seed: int):
    """Crops and their targets: bright-region masks (unet) or which photo a crop is from."""
    x = natural_crops(batch, size, seed).to(device)
    if name == "unet":
        return x, (x.mean(1, keepdim=True) > 0).float()
    return x, torch.arange(batch, device=device) % len(IMAGES)


def build(name: str, batch: int, size: int, device: str, seed: int = 0):
    """Model, a batch of crops and targets (see :func:`make_batch`), and the loss."""
    x, target = make_batch(name, batch, size, device, seed)
    if name == "unet":
        model = smp.Unet("resnet18", encoder_weights=None, classes=1).to(device)
        return model, x, target, nn.functional.binary_cross_entropy_with_logits
    model = torchvision.models.resnet18(num_classes=len(IMAGES)).to(device)
    return model, x, target, nn.functional.cross_entropy


def pretrain(model: nn.Module, args, loss_fn) -> None:
    """``args.train_steps`` exact Adam steps (lr 1e-3), each on fresh crops (seeds 1000+)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(args.train_steps):
        x, target = make_batch(args.model, args.batch, args.size, args.device, seed=1000 + step)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
    if args.train_steps:
        print(f"after {args.train_steps} exact Adam steps: training loss {loss.item():.4f}")


def full_gradient(model: nn.Module, x, target, loss_fn) -> torch.Tensor:
    """All parameter gradients of ``loss_fn(model(x), target)``, flattened; zeroed first."""
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), target).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def average_gradient_error(model: nn.Module, batches, loss_fn, exact: torch.Tensor) -> float:
    """``(1/M) sum_m ||exact - g_m||^2`` over minibatches ``[(x, target)]``."""
    return statistics.fmean((full_gradient(model, x, t, loss_fn) - exact).square().sum().item() for x, t in batches)


def capture_layers(model: nn.Module, x: torch.Tensor, target, loss_fn):
    """``[(name, conv, X, D, exact dW)]`` for every conv, from one exact backward pass."""
    records, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad:
            def hook(m, args, out, name=name):
                records[name] = [m, args[0].detach()]
                out.register_hook(lambda d: records[name].append(d.detach()))
            handles.append(module.register_forward_hook(hook))
    full_gradient(model, x, target, loss_fn)
    for h in handles:
        h.remove()
    return [(name, m, inp, d, m.weight.grad.clone()) for name, (m, inp, d) in records.items()]


def layer_options(options: dict, probes: int) -> dict:
    """``xconv.convert`` options at ``probes``; ``rank_fraction`` sets ``deflation_rank``."""
    options = dict(options, probes=probes)
    fraction = options.pop("rank_fraction", None)
    if fraction is not None:
        options["deflation_rank"] = max(1, int(fraction * probes))
    return options


def draw_errors(conv: nn.Module, x: torch.Tensor, d: torch.Tensor, exact: torch.Tensor, options, draws: int):
    """Mean relative error and cosine of ``draws`` estimates, and the fraction of ``||X||^2``
    a deflated sketch keeps exactly (None without deflation); None where XConv is skipped."""
    layer = xconv.convert(copy.deepcopy(conv), relu=False, **options)
    if not layer.uses_estimator(x.requires_grad_(False)):
        return None
    errors, cosines = [], []
    for _ in range(draws):
        (g,) = torch.autograd.grad(layer(x), layer.weight, d)
        errors.append(((g - exact).norm() / exact.norm()).item())
        cosines.append(nn.functional.cosine_similarity(g.flatten(), exact.flatten(), dim=0).item())
    basis = deflation_basis(x, layer.sketch_config, seed=0)
    kept = None
    if basis is not None:
        flat = x.flatten(2).float()
        kept = ((flat @ basis.t()).square().sum() / flat.square().sum()).item()
    return statistics.fmean(errors), statistics.fmean(cosines), kept


def selected_estimators(args):
    """``(label, options)`` of the estimators named by ``--estimators``, in table order."""
    return [(label, options) for label, options in ESTIMATORS if label in args.estimators]


def age_table(args, model: nn.Module, loss_fn) -> dict[tuple[str, int], float]:
    batches = [make_batch(args.model, args.batch, args.size, args.device, seed=1 + m) for m in range(args.age)]
    exact = torch.stack([full_gradient(model, x, t, loss_fn) for x, t in batches]).mean(0)
    sgd = average_gradient_error(model, batches, loss_fn, exact)
    print(f"\nAGE over {args.age} minibatches of {args.batch}; exact minibatch (SGD floor) AGE = {sgd:.4g}; "
          f"||g||^2 = {exact.square().sum().item():.4g} (g: exact full-data gradient)")
    print("| estimator | r | AGE | AGE / SGD AGE |")
    print("|---|---|---|---|")
    ratios = {}
    for label, options in selected_estimators(args):
        for r in args.probes:
            converted = xconv.convert(copy.deepcopy(model), relu=False, **layer_options(options, r))
            age = average_gradient_error(converted, batches, loss_fn, exact)
            ratios[label, r] = age / sgd
            print(f"| {label} | {r} | {age:.4g} | {age / sgd:.2f} |", flush=True)
    return ratios


def plot(path: Path, title: str, medians: dict[tuple[str, int], tuple[float, float]],
         age_ratios: dict[tuple[str, int], float]) -> None:
    """Median relative error, median cosine and AGE / SGD AGE against r, one line per estimator."""
    panels = [("median relative error", lambda k: medians[k][0]), ("median cosine", lambda k: medians[k][1])]
    if age_ratios:
        panels.append(("AGE / exact minibatch AGE", age_ratios.__getitem__))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (ylabel, value) in zip(axes, panels):
        for label in dict.fromkeys(k[0] for k in medians):
            rs = sorted(r for lab, r in medians if lab == label)
            ax.plot(rs, [value((label, r)) for r in rs], marker="o", label=label)
        if ylabel.startswith("AGE"):
            ax.axhline(1.0, color="black", lw=1, label="exact minibatch (SGD)")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("probes r")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["unet", "resnet18"], default="unet")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--probes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--estimators", nargs="+", default=[e[0] for e in ESTIMATORS], choices=[e[0] for e in ESTIMATORS])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=0, help="exact Adam steps before measuring")
    parser.add_argument("--age", type=int, default=0, metavar="M", help="also compute AGE over M minibatches")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, x, target, loss_fn = build(args.model, args.batch, args.size, args.device)
    pretrain(model.train(), args, loss_fn)
    layers = capture_layers(model.train(), x, target, loss_fn)
    rows, medians = [], {}
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {len(layers)} conv layers, {args.draws} draws each")
    print("| estimator | r | layers | median rel. error | median cosine | median kept energy |")
    print("|---|---|---|---|---|---|")
    for label, options in selected_estimators(args):
        for r in args.probes:
            per_layer = []
            for name, conv, inp, d, exact in layers:
                result = draw_errors(conv, inp, d, exact, layer_options(options, r), args.draws)
                if result is not None:
                    per_layer.append(result)
                    rows.append(dict(model=args.model, train_steps=args.train_steps, estimator=label, probes=r, layer=name,
                                     pixels=inp[0, 0].numel(), rel_error=result[0], cosine=result[1], kept_energy=result[2]))
            err = statistics.median(e for e, _, _ in per_layer)
            cos = statistics.median(c for _, c, _ in per_layer)
            medians[label, r] = err, cos
            kept = [k for _, _, k in per_layer if k is not None]
            kept = f"{statistics.median(kept):.2f}" if kept else "-"
            print(f"| {label} | {r} | {len(per_layer)} | {err:.2f} | {cos:.3f} | {kept} |", flush=True)
    age_ratios = age_table(args, model, loss_fn) if args.age else {}
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        title = f"{args.model}, batch {args.batch}, {args.size}x{args.size}, after {args.train_steps} exact steps"
        plot(args.plot, title, medians, age_ratios)


if __name__ == "__main__":
    main()
