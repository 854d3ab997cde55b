"""Run H's A/B: ``xconv/functional.py`` at an earlier commit ("before") against the checkout
("after"), both in one process. The earlier file is loaded from git and its ``XConvFunction`` and
``BitLeakyReLUFunction`` are swapped into ``xconv.nn`` for the "before" timings, so exact, before
and after share the machine's load; each round visits them in alternating order.

Usage, from the repository root (needs the git history):
    python results/bench/run_h/ab.py speed COMMIT ROUNDS [CASES] [MIN_RUN_TIME]
        # training steps; CASES 1: U-Net, 2: and ResNet-18; seconds per timed measurement (1.0)
    python results/bench/run_h/ab.py layers COMMIT ROUNDS
        # single layers of those models at r=8, before and after with contraction "auto", and
        # after with each order forced; the minimum over rounds, as a ratio to exact
    python results/bench/run_h/ab.py memory COMMIT   # step peaks of both, r = 4..32
"""
import argparse
import statistics
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_memory  # noqa: E402
import bench_speed  # noqa: E402
import xconv  # noqa: E402
from xconv import nn as xnn  # noqa: E402


def load_functional(commit):
    source = subprocess.run(["git", "show", f"{commit}:xconv/functional.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"xconv.functional_{commit}")
    module.__package__ = "xconv"
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{commit}:xconv/functional.py", "exec"), module.__dict__)
    return module


def versions(commit):
    old = load_functional(commit)
    return {"before": (old.XConvFunction, old.BitLeakyReLUFunction),
            "after": (xnn.XConvFunction, xnn.BitLeakyReLUFunction)}


def use(version):
    xnn.XConvFunction, xnn.BitLeakyReLUFunction = version


def speed(commit, rounds, cases=1, min_run_time=1.0):
    code = versions(commit)
    for name, make, shape in bench_speed.scaled(bench_speed.STEPS[:cases], 1):
        torch.manual_seed(0)
        timers = {"exact": bench_speed.step_timers(make, shape, 0, "cpu")[0]["total"]}
        xc = bench_speed.step_timers(make, shape, 8, "cpu")[0]["total"]
        times = {"exact": [], "before": [], "after": []}
        for i in range(rounds):
            order = ["exact", "before", "after"] if i % 2 == 0 else ["after", "before", "exact"]
            for label in order:
                if label != "exact":
                    use(code[label])
                times[label].append(bench_speed.median_seconds(timers.get(label, xc), min_run_time))
        use(code["after"])
        e = statistics.median(times["exact"])
        print(name, {k: f"{statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / e:.3f}x)" for k, v in times.items()})
        for label in ("before", "after"):
            print(f"  {label} / exact per round: {paired_ratios(times[label], times['exact'])}",
                  [round(a / b, 3) for a, b in zip(times[label], times["exact"])])
        print(f"  after / before per round: {paired_ratios(times['after'], times['before'])}", flush=True)


def paired_ratios(times, reference) -> str:
    """Median and quartiles of the rounds' ratios ``times[i] / reference[i]``, formatted."""
    q = bench_speed.round_ratio_quartiles(times, reference)
    return f"median {q['total_ratio_q2']:.3f}, quartiles {q['total_ratio_q1']:.3f}-{q['total_ratio_q3']:.3f}"


# (batch, C_in, C_out, kernel, stride, map size) of U-Net(resnet18) at batch 8 and ResNet-18 at batch 64
LAYERS = [(8, 256, 256, 3, 1, 8), (8, 768, 256, 3, 1, 8), (8, 512, 512, 3, 1, 4), (8, 256, 512, 3, 2, 8),
          (64, 512, 512, 3, 1, 4), (64, 256, 512, 3, 2, 8), (64, 128, 128, 3, 1, 4), (64, 64, 128, 3, 2, 8),
          (64, 64, 64, 3, 1, 8), (64, 3, 64, 7, 2, 32)]


def layers(commit, rounds):
    code = versions(commit)
    for batch, c_in, c_out, k, stride, size in LAYERS:
        x = torch.randn(batch, c_in, size, size, requires_grad=True)
        conv = torch.nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        grad = torch.randn_like(conv(x))
        variants = {"exact": (conv, None)}
        for order in ("auto", "probes", "decompress"):
            layer = xconv.XConv2d(c_in, c_out, k, stride, k // 2, bias=False, probes=8, contraction=order)
            layer.load_state_dict(conv.state_dict())
            if order == "auto":
                variants["before"] = (layer, "before")
            variants[f"after {order}"] = (layer, "after")

        def timer(layer, version):
            def run():
                if version:
                    use(code[version])
                layer(x).backward(grad)
            return run

        times = {label: [] for label in variants}
        for _ in range(rounds):
            for label, (layer, version) in variants.items():
                times[label].append(bench_speed.median_seconds(timer(layer, version), 0.2))
        use(code["after"])
        best = {label: min(t) for label, t in times.items()}
        print(f"b{batch} {c_in}->{c_out} {k}x{k}/{stride} at {size}x{size} (exact {best['exact'] * 1e3:.1f} ms): "
              + ", ".join(f"{label} {t / best['exact']:.2f}" for label, t in best.items() if label != "exact"),
              flush=True)


def memory(commit):
    code = versions(commit)
    for name in ("unet", "resnet18"):
        base, shape = bench_memory.MODELS[name]()
        torch.manual_seed(0)
        exact = bench_memory.step_peak(base, shape, "cpu")
        for r in (4, 8, 16, 32):
            for label in ("before", "after"):
                use(code[label])
                model = xconv.convert(bench_memory.MODELS[name]()[0], probes=r, relu=True)
                peak = bench_memory.step_peak(model, shape, "cpu")
                print(f"{name} r={r} {label}: step peak {peak / 2**20:.1f} MiB ({peak / exact:.3f}x exact)", flush=True)
        use(code["after"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode in ("speed", "layers", "memory"):
        sub = modes.add_parser(mode)
        sub.add_argument("commit", help="the earlier commit whose xconv/functional.py is 'before'")
        if mode != "memory":
            sub.add_argument("rounds", type=int)
        if mode == "speed":
            sub.add_argument("cases", type=int, nargs="?", default=1, choices=[1, 2])
            sub.add_argument("min_run_time", type=float, nargs="?", default=1.0)
    args = parser.parse_args(argv)
    if getattr(args, "rounds", 1) < 1 or not 0 < getattr(args, "min_run_time", 1.0) < float("inf"):
        parser.error("ROUNDS must be >= 1 and MIN_RUN_TIME a number of seconds > 0")
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.commit}^{{commit}}"], cwd=ROOT,
                           capture_output=True)
    if found.returncode != 0:
        parser.error(f"COMMIT {args.commit!r} is not a commit of {ROOT} (the A/B needs the git history)")
    if args.mode == "speed":
        speed(args.commit, args.rounds, args.cases, args.min_run_time)
    elif args.mode == "layers":
        layers(args.commit, args.rounds)
    else:
        memory(args.commit)


if __name__ == "__main__":
    main()
