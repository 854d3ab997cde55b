"""Weight-gradient quality of XConv estimators on the real activations of a real network.

The network and its batches come either from a task of the experiments (``--task``: the
task's model, data and loss exactly as ``run.py`` composes them from ``configs/``, with any
Hydra overrides after the options) or from ``--model unet|resnet18`` on natural-image crops
from scikit-image. For every conv layer (at initialisation, or after ``--train-steps`` exact
Adam steps on fresh batches), the layer's real input ``X`` and real upstream gradient ``D``
are captured from one exact backward pass. Each estimator configuration is then drawn ``--draws`` times
on that layer and compared with the exact weight gradient: relative error
``||g_hat - g|| / ||g||`` and cosine similarity (the paper's figures of merit). The table gives
the median over layers of the per-layer mean; the CSV has every layer. For deflated sketches
the table also gives the fraction of ``||X||^2`` the kept directions hold exactly.

With ``--age M`` it also computes the paper's average gradient error over ``M`` fresh
minibatches, ``AGE = (1/M) sum_m ||g - g_m||^2``: ``g`` the exact gradient of all parameters
over the M minibatches together (the full data of this measurement), ``g_m`` the minibatch
gradient, exact or XConv, with gradients zeroed between minibatches; next to it the exact
minibatch (SGD) AGE, the floor.

With ``--half bfloat16|float16`` it also measures the estimators under autocast in that
dtype (the layer computes in it; the parameters and their gradients stay fp32): the relative
error of the half-precision estimate against the fp32 exact gradient and against the fp32
estimate drawn with the same probes (same seed), next to the rounding floor, the exact conv's
own half-vs-fp32 error on the same layer.

With ``--storage-bits 8 4 2`` it also compares, layer by layer at equal bytes, SR low-bit storage
of the layer input (``storage="quantized"``) with the paper's sketch given the same bytes (per
layer ``r = bytes / (4 B C_in)``, independent mode; layers where that sketch would not be smaller
than the input are left out of its row).

With ``--equal-memory B0`` (``--model`` sources, with ``--age M``) it follows the paper's
equal-memory protocol: the budget is the activation bytes (``xconv.memory.saved_tensor_bytes``
of one training forward and loss) of the plain torch network at batch ``B0``; exact training,
exact with 1-bit ReLUs (``probes=0``), the sketch at each ``--probes`` r (the ``convert``
defaults) and SR storage at each ``--storage-bits`` (convs, BatchNorms, ReLUs and max-pools: the
``xconv=sr4`` settings at those bits) each run at the largest batch that fits the budget, and
each gets its AGE over ``M`` minibatches of that size (``g`` the exact gradient over its own
``M`` minibatches), next to exact training's AGE at ``B0``. ``--inputs noise`` feeds standard
normal images instead of photo crops (the paper: noise inputs, untrained weights).

With ``--plot PNG`` it draws the median relative error, the median cosine and (with ``--age``)
AGE / SGD AGE against r, one line per estimator.

Usage:
    python scripts/gradient_quality.py [--model unet|resnet18 | --task NAME [OVERRIDE ...]]
                                       [--probes 4 8 16 32] [--draws 8] [--train-steps 0] [--age M]
                                       [--half bfloat16|float16] [--storage-bits 8 4 2]
                                       [--inputs crops|noise] [--equal-memory B0]
                                       [--csv results/bench/gradient_cpu.csv] [--plot gradient.png]
    e.g. python scripts/gradient_quality.py --task classification data.batch_size=32 --age 8
"""
from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from lightning.fabric.utilities.apply_func import move_data_to_device
from skimage import data as skdata
from torch import nn

import xconv
from experiments.build import instantiate_node
from experiments.errors import ConfigError
from experiments.registry import register
from xconv._sketch import deflation_basis
from xconv.memory import saved_tensor_bytes
from xconv.quantize import stored_bytes
from benchlib import write_csv

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
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


@dataclass
class Source:
    """A network at fixed parameters, its training loss and a stream of training batches.

    ``batch(seed)`` is a batch drawn with ``seed`` (distinct seeds give fresh batches; a ``--model``
    source's ``batch(seed, size)`` one of ``size`` samples); ``loss(net, batch)`` the scalar
    training loss of ``batch`` through ``net`` (a mean over the batch).
    """

    name: str
    model: nn.Module
    loss: Callable[[nn.Module, object], torch.Tensor]
    batch: Callable[..., object]


def crop_source(name: str, batch: int, size: int, device: str, inputs: str = "crops") -> Source:
    """``--model``: a U-Net segmenting bright regions of natural crops, or a ResNet-18 telling which
    photo a crop is from; with ``inputs="noise"``, standard normal images in place of the crops."""
    def make_batch(seed: int, samples: int = batch):
        if inputs == "noise":
            x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
        else:
            x = natural_crops(samples, size, seed).to(device)
        if name == "unet":
            return x, (x.mean(1, keepdim=True) > 0).float()
        return x, torch.arange(samples, device=device) % len(IMAGES)

    if name == "unet":
        model, loss_fn = smp.Unet("resnet18", encoder_weights=None, classes=1), nn.functional.binary_cross_entropy_with_logits
    else:
        model, loss_fn = torchvision.models.resnet18(num_classes=len(IMAGES)), nn.functional.cross_entropy
    what = "crops" if inputs == "crops" else "noise images"
    return Source(f"{name}, batch {batch}, {size}x{size} {what}", model.to(device),
                  lambda net, b: loss_fn(net(b[0]), b[1]), make_batch)


def task_source(task: str, overrides: list[str], device: str) -> Source:
    """``--task``: the task's network, loss and training batches, composed from ``configs/`` as ``run.py`` does.

    Raises:
        hydra.errors.ConfigCompositionException: an unknown task or override.
        experiments.errors.ConfigError: a value the data module or task refuses, naming its key.
    """
    register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        # output_dir normally comes from Hydra's run directory; nothing is written here.
        cfg = compose("config", overrides=[f"task={task}", *overrides, "output_dir=."])
    torch.manual_seed(cfg.seed)
    datamodule = instantiate_node(cfg, "data")
    datamodule.setup("fit")
    module = instantiate_node(cfg, "task", _recursive_=False)

    def make_batch(seed: int):
        torch.manual_seed(seed)  # the training loader shuffles with torch's global generator
        return move_data_to_device(next(iter(datamodule.train_dataloader())), device)

    label = " ".join([f"task={task}", *overrides])
    return Source(label, module.net.to(device), lambda net, b: module.loss(b, net=net), make_batch)


def pretrain(source: Source, steps: int) -> None:
    """``steps`` exact Adam steps (lr 1e-3), each on a fresh batch (seeds 1000+)."""
    optimizer = torch.optim.Adam(source.model.parameters(), lr=1e-3)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = source.loss(source.model, source.batch(1000 + step))
        loss.backward()
        optimizer.step()
    if steps:
        print(f"after {steps} exact Adam steps: training loss {loss.item():.4f}")


def full_gradient(model: nn.Module, batch, loss) -> torch.Tensor:
    """All parameter gradients of ``loss(model, batch)``, flattened; zeroed first."""
    model.zero_grad(set_to_none=True)
    loss(model, batch).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def average_gradient_error(model: nn.Module, batches, loss, exact: torch.Tensor) -> float:
    """``(1/M) sum_m ||exact - g_m||^2`` over the minibatches ``batches``."""
    return statistics.fmean((full_gradient(model, b, loss) - exact).square().sum().item() for b in batches)


def capture_layers(model: nn.Module, batch, loss):
    """``[(name, conv, X, D, exact dW)]`` for every 2-d conv and transposed conv, from one exact backward pass.

    A conv that the loss calls more than once (a GAN's discriminator on real and fake images)
    has a weight gradient summed over its calls, which no single ``(X, D)`` pair gives; such
    convs are left out.
    """
    records, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.weight.requires_grad:
            def hook(m, args, out, name=name):
                calls = records.setdefault(name, [m, []])[1]
                calls.append([args[0].detach()])
                out.register_hook(lambda d: calls[-1].append(d.detach()))
            handles.append(module.register_forward_hook(hook))
    full_gradient(model, batch, loss)
    for h in handles:
        h.remove()
    return [(name, m, calls[0][0], calls[0][1], m.weight.grad.clone())
            for name, (m, calls) in records.items() if len(calls) == 1 and len(calls[0]) == 2]


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
    layer = xconv.convert(copy.deepcopy(conv), relu="exact", **options)
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


def equal_bytes_table(layers, bits_list, draws: int) -> list[dict]:
    """Per bits: the median over layers of the relative error of SR storage and of the sketch kept in
    the same bytes; prints a markdown table and returns one row per layer and storage."""
    rows = []
    print("| storage | median bytes / fp32 input | layers | median rel. error | median cosine |")
    print("|---|---|---|---|---|")
    for bits in bits_list:
        results = {"SR": [], "sketch": []}
        for name, conv, inp, d, exact in layers:
            kept = stored_bytes(inp.shape, bits)
            probes = max(1, round(kept / (inp.shape[0] * inp.shape[1] * inp.element_size())))
            for kind, options in (("SR", dict(storage="quantized", bits=bits)), ("sketch", dict(probes=probes))):
                result = draw_errors(conv, inp, d, exact, options, draws)
                if result is not None:
                    results[kind].append(result)
                    rows.append(dict(layer=name, bits=bits, storage=kind, probes=probes if kind == "sketch" else None,
                                     bytes=kept, rel_error=result[0], cosine=result[1]))
        for kind, per_layer in results.items():
            if per_layer:
                label = f"SR {bits}-bit" if kind == "SR" else f"sketch in SR {bits}-bit's bytes"
                ratio = statistics.median(stored_bytes(inp.shape, bits) / (4 * inp.numel()) for _, _, inp, _, _ in layers)
                print(f"| {label} | {ratio:.3f} | {len(per_layer)} "
                      f"| {statistics.median(e for e, _, _ in per_layer):.4f} "
                      f"| {statistics.median(c for _, c, _ in per_layer):.4f} |", flush=True)
    return rows


def _half_weight_grad(layer: nn.Module, x: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype):
        y = layer(x)
    return torch.autograd.grad(y, layer.weight, d.to(dtype))[0]


def half_errors(conv: nn.Module, x: torch.Tensor, d: torch.Tensor, exact: torch.Tensor, options, draws: int,
                dtype: torch.dtype):
    """Mean relative errors of ``draws`` estimates under autocast in ``dtype``: against the fp32
    exact gradient and against the fp32 estimate with the same probes; None where XConv is skipped."""
    layer = xconv.convert(copy.deepcopy(conv), relu="exact", **options)
    if not layer.uses_estimator(x.requires_grad_(False)):
        return None
    to_exact, to_fp32 = [], []
    for draw in range(draws):
        torch.manual_seed(draw)  # the same probe seed for both precisions
        (g32,) = torch.autograd.grad(layer(x), layer.weight, d)
        torch.manual_seed(draw)
        g_half = _half_weight_grad(layer, x, d, dtype)
        to_exact.append(((g_half - exact).norm() / exact.norm()).item())
        to_fp32.append(((g_half - g32).norm() / g32.norm()).item())
    return statistics.fmean(to_exact), statistics.fmean(to_fp32)


def half_table(args, layers) -> list[dict]:
    """Print the ``--half`` table (medians over layers) and return its per-layer CSV rows."""
    dtype = getattr(torch, args.half)
    floors = {name: ((_half_weight_grad(conv, x, d, dtype) - exact).norm() / exact.norm()).item()
              for name, conv, x, d, exact in layers}
    print(f"\n{args.half} autocast; rounding floor = the exact conv's {args.half}-vs-fp32 error, "
          f"median over layers {statistics.median(floors.values()):.2g}")
    print(f"| estimator | r | {args.half} XConv vs fp32 exact | {args.half} XConv vs fp32 XConv, same probes "
          "| that / rounding floor |")
    print("|---|---|---|---|---|")
    rows = []
    for label, options in selected_estimators(args):
        for r in args.probes:
            per_layer = []
            for name, conv, x, d, exact in layers:
                result = half_errors(conv, x, d, exact, layer_options(options, r), args.draws, dtype)
                if result is not None:
                    per_layer.append((*result, result[1] / floors[name]))
                    rows.append(dict(estimator=label, probes=r, layer=name, precision=args.half,
                                     rounding_floor=floors[name], rel_error_half=result[0], rel_error_half_vs_fp32=result[1]))
            med = [statistics.median(v) for v in zip(*per_layer)]
            print(f"| {label} | {r} | {med[0]:.3g} | {med[1]:.2g} | {med[2]:.2f} |", flush=True)
    return rows


def selected_estimators(args):
    """``(label, options)`` of the estimators named by ``--estimators``, in table order."""
    return [(label, options) for label, options in ESTIMATORS if label in args.estimators]


def age_table(args, source: Source) -> dict[tuple[str, int], float]:
    model, loss = source.model, source.loss
    batches = [source.batch(1 + m) for m in range(args.age)]
    exact = torch.stack([full_gradient(model, b, loss) for b in batches]).mean(0)
    sgd = average_gradient_error(model, batches, loss, exact)
    print(f"\nAGE over {args.age} minibatches; exact minibatch (SGD floor) AGE = {sgd:.4g}; "
          f"||g||^2 = {exact.square().sum().item():.4g} (g: exact gradient over all M minibatches)")
    print("| estimator | r | AGE | AGE / SGD AGE |")
    print("|---|---|---|---|")
    ratios = {}
    for label, options in selected_estimators(args):
        for r in args.probes:
            converted = xconv.convert(copy.deepcopy(model), relu="exact", **layer_options(options, r))
            age = average_gradient_error(converted, batches, loss, exact)
            ratios[label, r] = age / sgd
            print(f"| {label} | {r} | {age:.4g} | {age / sgd:.2f} |", flush=True)
    return ratios


def activation_bytes(model: nn.Module, source: Source, samples: int) -> int:
    """Bytes kept for backward by one training forward and loss of ``model`` on ``samples`` samples."""
    return saved_tensor_bytes(lambda: source.loss(model, source.batch(0, samples)), model=model).total_bytes


def largest_batch(model: nn.Module, source: Source, budget: int, cap: int) -> tuple[int, int]:
    """The largest batch size up to ``cap`` whose :func:`activation_bytes` fit ``budget`` (at least 2:
    BatchNorm needs two samples where a map shrinks to 1x1), and those bytes: bytes grow linearly
    with the batch, so the size is read off batches 2 and 4, then checked."""
    two, four = activation_bytes(model, source, 2), activation_bytes(model, source, 4)
    per_sample = max((four - two) // 2, 1)
    size = max(2, min(cap, (budget - (two - 2 * per_sample)) // per_sample))
    kept = activation_bytes(model, source, size)
    while size > 2 and kept > budget:
        size -= 1
        kept = activation_bytes(model, source, size)
    return size, kept


def equal_memory_methods(args) -> list[tuple[str, dict | None]]:
    """``(label, convert options or None for the torch network)`` of the ``--equal-memory`` table."""
    return [("exact", None), ("exact, 1-bit ReLU", dict(probes=0)),
            *((f"sketch r={r}", dict(probes=r)) for r in args.probes),
            *((f"SR {b}-bit", dict(storage="quantized", bits=b, batchnorm_bits=b, maxpool=True)) for b in args.storage_bits)]


def equal_memory_table(args, source: Source) -> list[dict]:
    """Print the ``--equal-memory`` table and return its rows: each method at the largest batch whose
    activation bytes fit exact training's at ``--equal-memory`` samples, with its AGE there."""
    budget = activation_bytes(source.model, source, args.equal_memory)
    sgd = None
    print(f"\nEqual memory: {budget / 2**20:.2f} MiB of activations, exact training's at batch {args.equal_memory}; "
          f"AGE over {args.age} minibatches of each method's batch")
    print("| method | batch | activation bytes / budget | AGE | AGE / exact's at the budget batch |")
    print("|---|---|---|---|---|")
    rows = []
    for label, options in equal_memory_methods(args):
        if options is None:
            model, size, kept = source.model, args.equal_memory, budget
        else:
            model = xconv.convert(copy.deepcopy(source.model), **options)
            size, kept = largest_batch(model, source, budget, 16 * args.equal_memory)
        batches = [source.batch(1 + m, size) for m in range(args.age)]
        exact = torch.stack([full_gradient(source.model, b, source.loss) for b in batches]).mean(0)
        age = average_gradient_error(model, batches, source.loss, exact)
        sgd = age if sgd is None else sgd
        rows.append(dict(source=source.name, train_steps=args.train_steps, method=label, batch=size,
                         activation_bytes=kept, budget_bytes=budget, age=age, age_vs_exact=age / sgd))
        print(f"| {label} | {size} | {kept / budget:.3f} | {age:.4g} | {age / sgd:.2f} |", flush=True)
    return rows


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


def _at_least(low: int):
    """An argparse type: an int >= ``low``, else argparse's one-line error naming the option."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source_group = parser.add_mutually_exclusive_group()
    source_group.add_argument("--model", choices=["unet", "resnet18"], default="unet", help="natural-crop source")
    source_group.add_argument("--task", default=None, choices=sorted(f.stem for f in (REPO_ROOT / "configs" / "task").glob("*.yaml")),
                              help="a task of configs/task/; Hydra overrides (key=value) may follow the options")
    parser.add_argument("--batch", type=_at_least(2), default=8, help="crops per batch (--model only)")
    parser.add_argument("--size", type=_at_least(32), default=128, help="crop side (--model only)")
    parser.add_argument("--probes", type=_at_least(1), nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--draws", type=_at_least(1), default=8)
    parser.add_argument("--estimators", nargs="+", default=[e[0] for e in ESTIMATORS], choices=[e[0] for e in ESTIMATORS])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=_at_least(0), default=0, help="exact Adam steps before measuring")
    parser.add_argument("--age", type=_at_least(0), default=0, metavar="M",
                        help="also compute AGE over M >= 2 minibatches (one has no spread to measure)")
    parser.add_argument("--half", choices=["bfloat16", "float16"], default=None,
                        help="also compare estimates under autocast in this dtype with fp32 ones")
    parser.add_argument("--storage-bits", type=int, nargs="+", default=[], choices=[2, 4, 8, 16],
                        help="also compare SR storage at these bits with the sketch at equal bytes")
    parser.add_argument("--inputs", choices=["crops", "noise"], default="crops",
                        help="photo crops or standard normal images (--model only)")
    parser.add_argument("--equal-memory", type=_at_least(0), default=0, metavar="B0",
                        help="with --age: AGE of each method at the largest batch that fits exact's bytes at batch B0")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG")
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.task is None:
        parser.error(f"Hydra overrides {overrides} need --task")
    if args.age == 1:
        parser.error("--age M must be 0 (no AGE) or >= 2: one minibatch's gradient is the exact gradient of its own data")
    if args.equal_memory == 1 or (args.equal_memory and (args.task is not None or args.age < 2)):
        parser.error(f"--equal-memory B0 must be a batch size >= 2 used with --model and --age M >= 2, got "
                     f"--equal-memory {args.equal_memory}{f' --task {args.task}' if args.task else ''} --age {args.age}")
    if args.inputs != "crops" and args.task is not None:
        parser.error("--inputs noise needs --model (a task brings its own data)")
    torch.manual_seed(0)
    try:
        source = (task_source(args.task, overrides, args.device) if args.task
                  else crop_source(args.model, args.batch, args.size, args.device, args.inputs))
    except (ConfigCompositionException, OverrideParseException) as err:
        parser.error(f"Hydra overrides {overrides}: {str(err).splitlines()[0]}")
    except ConfigError as err:  # a bad value, named as run.py names it
        parser.error(str(err))
    source.model.train()
    pretrain(source, args.train_steps)
    layers = capture_layers(source.model, source.batch(0), source.loss)
    rows, medians = [], {}
    print(f"{source.name}: {len(layers)} conv layers, {args.draws} draws each")
    print("| estimator | r | layers | median rel. error | median cosine | median kept energy |")
    print("|---|---|---|---|---|---|")
    for label, options in selected_estimators(args):
        for r in args.probes:
            per_layer = []
            for name, conv, inp, d, exact in layers:
                result = draw_errors(conv, inp, d, exact, layer_options(options, r), args.draws)
                if result is not None:
                    per_layer.append(result)
                    rows.append(dict(source=source.name, train_steps=args.train_steps, estimator=label, probes=r, layer=name,
                                     pixels=inp[0, 0].numel(), rel_error=result[0], cosine=result[1], kept_energy=result[2]))
            err = statistics.median(e for e, _, _ in per_layer)
            cos = statistics.median(c for _, c, _ in per_layer)
            medians[label, r] = err, cos
            kept = [k for _, _, k in per_layer if k is not None]
            kept = f"{statistics.median(kept):.2f}" if kept else "-"
            print(f"| {label} | {r} | {len(per_layer)} | {err:.2f} | {cos:.3f} | {kept} |", flush=True)
    if args.storage_bits:
        storage_rows = equal_bytes_table(layers, args.storage_bits, args.draws)
        if args.csv:
            write_csv(storage_rows, args.csv.with_name(f"{args.csv.stem}_storage{args.csv.suffix}"))
    age_ratios = age_table(args, source) if args.age else {}
    if args.equal_memory:
        memory_rows = equal_memory_table(args, source)
        if args.csv:
            write_csv(memory_rows, args.csv.with_name(f"{args.csv.stem}_equal_memory{args.csv.suffix}"))
    if args.csv:
        write_csv(rows, args.csv)
    if args.half:
        half_rows = half_table(args, layers)
        if args.csv:
            write_csv(half_rows, args.csv.with_name(f"{args.csv.stem}_{args.half}{args.csv.suffix}"))
    if args.plot:
        title = f"{source.name}, after {args.train_steps} exact steps"
        plot(args.plot, title, medians, age_ratios)


if __name__ == "__main__":
    main()
