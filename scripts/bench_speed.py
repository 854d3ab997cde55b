"""Speed of exact vs XConv layers and training steps, as ratios measured in one process.

Times are medians from ``torch.utils.benchmark`` (warm-up, repeated blocks; it
synchronises CUDA), taken over ``--rounds`` rounds that visit exact and every r in turn, so
load from other processes on a shared machine hits all variants alike. The quartiles of the
rounds' own total ratios (each XConv time over the exact time of the same round) are printed
too: their median is moved less by that load than the ratio of medians, and their spread shows
how far it moved single rounds. Single layers: forward (grad mode on), forward+backward, and
backward as their difference. Training steps: forward, loss, backward, SGD step of a whole model,
with every conv converted at r (or stored in SR bits, or as the byte-budget planner chose on the
step's batch: ``--budgets``) and the 1-bit ReLU. Prints a markdown table and writes CSV.

With ``--compile BACKEND [BACKEND ...]`` every model (exact and XConv alike) runs through
``torch.compile(model, backend=BACKEND, mode=--compile-mode)`` for each backend in turn
(``none``: eagerly); the first, untimed call compiles, and the graph breaks it caused are
counted and their distinct reasons printed (a converted model compiles whole: zero is the
expected count). Ratios are against the exact model of the same backend, and, where ``none``
is among the backends, ``vs_eager_exact`` is against the eager exact model. On CUDA each row
also has the peak memory of one call (``peak_mib``, ``torch.cuda.max_memory_allocated``).

``--batch-scale K`` multiplies every case's batch size by K: on a GPU the default sizes take
well under a millisecond per layer, where fixed per-call costs dominate. ``--small`` runs every
case at batch 2 and a quarter of its image size: a quick check that a command runs end to end
(``scripts/gpu_bench.sh --device cpu``), not a measurement. ``--profile``
prints ``torch.profiler`` operator tables (self device time on CUDA, self CPU time on CPU)
instead of timing, to see where a ratio comes from. On CUDA, cuDNN runs fp32 convolutions in
TF32 by default while matmuls (XConv's contractions) stay fp32; ``--matmul-tf32`` lets the
matmuls use TF32 too.

On the CPU, glibc's malloc returns large freed blocks to the system and takes them back with page
faults (zeroed pages) at their next use: 0 to ~37,000 faults (up to ~90 ms) per U-Net step, by how
the blocks of the models timed in one process happen to fall, which moves single ratios by up to
10%. ``--keep-freed-memory`` tells it to keep freed memory (as jemalloc and tcmalloc do), so every
variant times its compute without those faults.

Usage:
    python scripts/bench_speed.py [--probes 4 8 16 32] [--storage-bits 8 4] [--budgets 0.25] [--min-run-time 1.0]
                                  [--only layers|steps] [--compile none inductor]
                                  [--compile-mode reduce-overhead] [--batch-scale 1] [--small]
                                  [--device cuda] [--keep-freed-memory]
                                  [--csv results/bench/speed_cpu.csv | --profile]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import statistics
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torchvision
from torch import nn
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity
from torch.utils import benchmark

import xconv
from xconv.memory import cuda_peak_memory_bytes
from benchlib import write_csv

# (name, torch layer, input shape); "{b}" in a name is the batch size.
LAYERS = [
    ("conv3x3 64->64 32x32 b{b}", lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 64, 32, 32)),
    ("conv3x3 256->256 8x8 b{b}", lambda: nn.Conv2d(256, 256, 3, padding=1), (128, 256, 8, 8)),
    ("stem7x7/2 3->64 128x128 b{b}", lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3), (32, 3, 128, 128)),
    ("convT4x4/2 128->64 16x16 b{b}", lambda: nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), (64, 128, 16, 16)),
]
# (name, model, input shape)
STEPS = [
    ("U-Net(resnet18) b{b} 128x128", lambda: smp.Unet("resnet18", encoder_weights=None, classes=2), (8, 3, 128, 128)),
    ("resnet18 b{b} 32x32", lambda: torchvision.models.resnet18(num_classes=10), (64, 3, 32, 32)),
]


def keep_freed_memory() -> None:
    """Make glibc's malloc keep the memory this process frees (never trim the heap; blocks up to
    32 MiB, glibc's limit, from the heap rather than their own mappings).

    Raises:
        OSError: the C library is not glibc (no ``mallopt``) or refuses the settings.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if not hasattr(libc, "mallopt"):
        raise OSError("--keep-freed-memory needs glibc's mallopt, which this C library lacks")
    trim_threshold, mmap_threshold = -1, -3  # glibc's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    if not (libc.mallopt(trim_threshold, 2**31 - 1) and libc.mallopt(mmap_threshold, 32 * 2**20)):
        raise OSError("glibc's mallopt refused the settings of --keep-freed-memory")


def scaled(cases, batch_scale: int, small: bool = False):
    """``cases`` with every batch size multiplied by ``batch_scale`` and named accordingly; ``small``:
    batch 2 and every image dimension divided by 4 (at least 2), the name saying so."""
    out = []
    for name, make, shape in cases:
        batch = shape[0] * batch_scale
        if small:
            shape = (2, shape[1], *(max(2, size // 4) for size in shape[2:]))
            name = f"{name} (small: {'x'.join(map(str, shape))})"
        out.append((name.format(b=batch), make, (shape[0] if small else batch, *shape[1:])))
    return out


def median_seconds(fn, min_run_time: float) -> float:
    fn()  # warm-up
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def compiled(model: nn.Module, backend: str | None, run, mode: str | None = None) -> tuple[nn.Module, dict]:
    """``model`` compiled with ``backend`` and ``mode`` (as is when ``backend`` is None) and the graph
    breaks of compiling it.

    ``run(compiled_model)`` is called once to trigger compilation. Returns the model and
    ``{"graph_breaks": count, "break_reasons": [first line of each distinct reason]}`` (empty
    without a backend).
    """
    if backend is None:
        return model, {}
    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(model, backend=backend, mode=mode)
    run(model)
    reasons = counters["graph_break"]
    return model, {"graph_breaks": sum(reasons.values()),
                   "break_reasons": sorted({r.splitlines()[0] for r in reasons})}


def convert_options(variant) -> dict | None:
    """``xconv.convert`` options of a variant: None for exact (``0``), the sketch at r (an int ``r``),
    SR storage (``"sr4"``: convs and BatchNorms at 4 bits, window-offset max-pools) or the byte-budget
    planner (``"plan0.25"``: as ``xconv=plan25``, 4-bit BatchNorms, offset max-pools, each conv's storage
    planned by :func:`plan` on the step's batch to fit 0.25x of plain torch's activation bytes)."""
    if variant == 0:
        return None
    if isinstance(variant, str) and variant.startswith("plan"):
        return dict(batchnorm_bits=4, maxpool=True)
    if isinstance(variant, str):
        bits = int(variant[2:])
        return dict(storage="quantized", bits=bits, batchnorm_bits=bits, maxpool=True)
    return dict(probes=variant)


def variant_label(variant) -> str:
    options = convert_options(variant)
    if isinstance(variant, str) and variant.startswith("plan"):
        return f"planner {variant[4:]}x"
    return "exact" if options is None else f"SR {options['bits']}-bit" if isinstance(variant, str) else f"r={variant}"


def _step_loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x).float().square().mean()


def plan(model: nn.Module, variant, x: torch.Tensor) -> None:
    """Apply the byte-budget planner's choices for a ``"plan<budget>"`` variant, planned on ``x``; nothing otherwise."""
    if isinstance(variant, str) and variant.startswith("plan"):
        xconv.plan_storage(model, _step_loss, x, budget=float(variant[4:])).apply(model)


def layer_timers(make, shape, variant, device, backend=None, mode=None):
    """``{"forward": fn, "total": fn}`` for one layer at ``variant`` (see :func:`convert_options`), and its
    compile report."""
    layer = make().to(device)
    if variant:
        layer = xconv.convert(layer, **convert_options(variant))
    x = torch.randn(shape, device=device, requires_grad=True)
    layer, report = compiled(layer, backend, lambda m: m(x).sum().backward(), mode)
    grad_y = torch.randn_like(layer(x))
    return {"forward": lambda: layer(x), "total": lambda: layer(x).backward(grad_y)}, report


def step_timers(make, shape, variant, device, backend=None, mode=None):
    """``{"total": fn}``: one SGD training step of a model converted at ``variant`` with the 1-bit ReLU,
    and its compile report."""
    model = make().to(device).train()
    x = torch.randn(shape, device=device)
    if variant:
        xconv.convert(model, relu="bit", **convert_options(variant))
        plan(model, variant, x)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    model, report = compiled(model, backend, lambda m: _step_loss(m, x).backward(), mode)

    def step():
        opt.zero_grad(set_to_none=True)
        _step_loss(model, x).backward()
        opt.step()

    return {"total": step}, report


def run(kind, cases, make_timers, variants_list, device, min_run_time, rounds, backend=None, mode=None):
    rows = []
    for name, make, shape in cases:
        variants = [0, *variants_list]
        timers, reports = [], []
        for r in variants:
            torch.manual_seed(0)
            timer, report = make_timers(make, shape, r, device, backend, mode)
            timers.append(timer)
            reports.append(report)
        peaks = [cuda_peak_memory_bytes(timer["total"], device=device) for timer in timers]
        samples = [{key: [] for key in t} for t in timers]
        for _ in range(rounds):
            for timer, sample in zip(timers, samples):
                for key, fn in timer.items():
                    sample[key].append(median_seconds(fn, min_run_time))
        medians = [{f"{k}_s": statistics.median(v) for k, v in sample.items()} for sample in samples]
        for m in medians:
            if "forward_s" in m:
                m["backward_s"] = m["total_s"] - m["forward_s"]
        for r, times, sample, report, peak in zip(variants, medians, samples, reports, peaks):
            row = {"kind": kind, "case": name, "variant": variant_label(r), "device": device,
                   "compile": backend or "none"}
            if backend:
                row.update(compile_mode=mode or "default", graph_breaks=report["graph_breaks"],
                           break_reasons="; ".join(report["break_reasons"]))
            if peak is not None:
                row["peak_mib"] = peak / 2**20
            row.update(times)
            row.update({k.replace("_s", "_ratio"): v / medians[0][k] for k, v in times.items()})
            row.update(round_ratio_quartiles(sample["total"], samples[0]["total"]))
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def round_ratio_quartiles(times, exact_times) -> dict:
    """Quartiles of the per-round ratios ``times[i] / exact_times[i]`` (seconds, one per round).
    Each pair was timed back to back, so their median is robust to load that moves between
    rounds, and the spread shows how far that load moved a single round's ratio. Keys
    ``total_ratio_q1``, ``total_ratio_q2`` (the median), ``total_ratio_q3``."""
    ratios = [t / e for t, e in zip(times, exact_times)]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"total_ratio_q1": q1, "total_ratio_q2": q2, "total_ratio_q3": q3}


def profile(kind, cases, make_timers, variants_list, device, iterations: int) -> str:
    """``torch.profiler``'s operator table of ``iterations`` forward+backward passes (layers) or
    training steps, exact and at each variant (:func:`convert_options`), heaviest first: self device time on CUDA, self CPU
    time on CPU. Each heading gives the wall-clock time per iteration (seconds, synchronised)."""
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    parts = []
    for name, make, shape in cases:
        for r in [0, *variants_list]:
            torch.manual_seed(0)
            fn = make_timers(make, shape, r, device)[0]["total"]
            fn()
            sync()
            with torch.profiler.profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(iterations):
                    fn()
                sync()
                wall = (time.perf_counter() - start) / iterations
            variant = variant_label(r)
            table = prof.key_averages().table(
                sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25)
            parts.append(f"## {kind} {name}, {variant}: {wall * 1e3:.2f} ms per iteration (profiled)\n\n{table}")
            print(parts[-1], flush=True)
    return "\n".join(parts)


def format_row(row):
    parts = [row["kind"], row["case"], row["variant"]]
    for key in ("forward", "backward", "total"):
        if f"{key}_s" in row:
            parts.append(f"{key} {row[f'{key}_s'] * 1e3:.1f} ms ({row[f'{key}_ratio']:.2f}x)")
    if row["variant"] != "exact":
        parts.append(f"rounds' total ratios {row['total_ratio_q2']:.2f} "
                     f"(quartiles {row['total_ratio_q1']:.2f}-{row['total_ratio_q3']:.2f})")
    if "vs_eager_exact" in row:
        parts.append(f"{row['vs_eager_exact']:.2f}x eager exact")
    if "peak_mib" in row:
        parts.append(f"peak {row['peak_mib']:.0f} MiB")
    if "graph_breaks" in row:
        parts.append(f"{row['compile']} ({row['compile_mode']}): {row['graph_breaks']} graph breaks "
                     f"({row['break_reasons'] or 'none'})")
    return "| " + " | ".join(parts) + " |"


def add_eager_ratios(rows) -> None:
    """Give every compiled row ``vs_eager_exact``: its total time over the eager exact row's of its case."""
    eager = {(r["kind"], r["case"]): r["total_s"] for r in rows if r["compile"] == "none" and r["variant"] == "exact"}
    for row in rows:
        if row["compile"] != "none" and (row["kind"], row["case"]) in eager:
            row["vs_eager_exact"] = row["total_s"] / eager[row["kind"], row["case"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--storage-bits", type=int, nargs="+", default=[], choices=[2, 4, 8, 16],
                        help="also time SR storage of conv and BatchNorm inputs at these bits (offset max-pools)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[], metavar="FRACTION",
                        help="training steps only: also time the byte-budget planner at these fractions of plain "
                             "torch's activation bytes (as xconv=plan25: 4-bit BatchNorms, offset max-pools)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timed measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants")
    parser.add_argument("--only", choices=["layers", "steps"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", nargs="+", default=["none"], metavar="BACKEND",
                        help="time every model eagerly (none) and/or compiled with these backends (inductor, ...)")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile's mode (reduce-overhead: CUDA graphs on a GPU)")
    parser.add_argument("--small", action="store_true",
                        help="batch 2 and a quarter of each image size: a quick end-to-end check, not a measurement")
    parser.add_argument("--batch-scale", type=int, default=1, metavar="K",
                        help="multiply every case's batch size by K (larger batches: less per-call overhead)")
    parser.add_argument("--matmul-tf32", action="store_true",
                        help="let CUDA matmuls use TF32, as cuDNN convolutions do by default (cudnn.allow_tf32)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, print torch.profiler operator tables of 10 iterations")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc: keep freed blocks of up to 32 MiB in the process (no page faults of reused "
                             "blocks in the timings)")
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.batch_scale < 1:
        parser.error(f"--batch-scale must be an int >= 1, got {args.batch_scale}")
    if args.rounds < 1 or not 0 < args.min_run_time < math.inf:
        parser.error(f"--rounds must be >= 1 and --min-run-time > 0, got {args.rounds} and {args.min_run_time}")
    if args.profile and (args.csv or args.compile != ["none"]):
        parser.error("--profile prints operator tables of eager models: it takes neither --csv nor --compile")
    if not all(0 < b <= 1 for b in args.budgets):
        parser.error(f"--budgets must be fractions in (0, 1], got {args.budgets}")
    if any(r < 1 for r in args.probes):
        parser.error(f"--probes must be ints >= 1 (exact is always measured), got {args.probes}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here (use --device cpu)")
    backends = torch.compiler.list_backends(exclude_tags=())
    for backend in args.compile:
        if backend != "none" and backend not in backends:
            parser.error(f"--compile must be none or one of torch.compiler.list_backends(exclude_tags=()): "
                         f"{', '.join(backends)}; got {backend!r}")
    if args.keep_freed_memory:
        try:
            keep_freed_memory()
        except OSError as err:
            parser.error(str(err))
    torch.backends.cuda.matmul.allow_tf32 = args.matmul_tf32
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"matmul TF32 {args.matmul_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}, "
          f"freed memory kept {args.keep_freed_memory}")
    layer_variants = [*args.probes, *(f"sr{b}" for b in args.storage_bits)]
    kinds = [("layer", scaled(LAYERS, args.batch_scale, args.small), layer_timers, layer_variants),
             ("step", scaled(STEPS, args.batch_scale, args.small), step_timers,
              [*layer_variants, *(f"plan{b:g}" for b in args.budgets)])]
    kinds = [k for k in kinds if args.only in (None, k[0] + "s")]
    if args.profile:
        for kind, cases, make, variants in kinds:
            profile(kind, cases, make, variants, args.device, iterations=10)
        return
    rows = []
    for backend in args.compile:
        for kind, cases, make, variants in kinds:
            rows += run(kind, cases, make, variants, args.device, args.min_run_time, args.rounds,
                        None if backend == "none" else backend, args.compile_mode)
    add_eager_ratios(rows)
    if "none" in args.compile and len(args.compile) > 1:
        print("Compiled against eager exact:")
        for row in rows:
            if "vs_eager_exact" in row:
                print(format_row(row), flush=True)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
