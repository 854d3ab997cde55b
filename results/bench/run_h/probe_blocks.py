"""Run H's A/B of the probes order's blocks: ``A`` built a few samples at a time, with layers whose
chunks held fewer than 4 samples decompressed (before, as at 5aee0c5), or built a block of taps
of the whole batch at a time, with layers whose blocks hold fewer than 8 samples decompressed
(after, the checkout). Both versions run in one process: "before" is that commit's
``xconv/functional.py`` loaded from git, its contraction choice and weight gradient swapped in.

Usage, from the repository root (needs the git history):
    python results/bench/run_h/probe_blocks.py speed ROUNDS [CASES]   # CASES 1: U-Net step, 2: and ResNet-18
    python results/bench/run_h/probe_blocks.py memory                 # step peaks of both, r = 4..32
"""
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
from xconv import functional as F  # noqa: E402

BEFORE_COMMIT = "5aee0c5"


def load_before():
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:xconv/functional.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("xconv.functional_before")
    module.__package__ = "xconv"
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{BEFORE_COMMIT}:xconv/functional.py", "exec"), module.__dict__)
    return module


OLD = load_before()
VERSIONS = {"before": (OLD.choose_contraction, OLD._independent_weight_grad),
            "after": (F.choose_contraction, F._independent_weight_grad)}


def use(label):
    F.choose_contraction, F._independent_weight_grad = VERSIONS[label]


def speed(rounds, cases=1):
    for name, make, shape in bench_speed.scaled(bench_speed.STEPS[:cases], 1):
        torch.manual_seed(0)
        exact = bench_speed.step_timers(make, shape, 0, "cpu")[0]["total"]
        xc = bench_speed.step_timers(make, shape, 8, "cpu")[0]["total"]
        times = {"exact": [], **{k: [] for k in VERSIONS}}
        for _ in range(rounds):
            times["exact"].append(bench_speed.median_seconds(exact, 0.01))
            for label in VERSIONS:
                use(label)
                times[label].append(bench_speed.median_seconds(xc, 0.01))
        e = statistics.median(times["exact"])
        print(name, {k: f"{statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / e:.3f}x)" for k, v in times.items()})
        for label in VERSIONS:
            ratios = [a / b for a, b in zip(times[label], times["exact"])]
            q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            print(f"  per round {label}: median {med:.3f}, quartiles {q1:.3f}-{q3:.3f}",
                  [round(x, 3) for x in ratios], flush=True)
        paired = [a / b for a, b in zip(times["after"], times["before"])]
        print(f"  after / before per round: median {statistics.median(paired):.3f}", flush=True)


def memory():
    for name in ("unet", "resnet18"):
        base, shape = bench_memory.MODELS[name]()
        torch.manual_seed(0)
        exact = bench_memory.step_peak(base, shape, "cpu")
        for r in (4, 8, 16, 32):
            for label in VERSIONS:
                use(label)
                model = xconv.convert(bench_memory.MODELS[name]()[0], probes=r, relu=True)
                peak = bench_memory.step_peak(model, shape, "cpu")
                print(f"{name} r={r} {label}: step peak {peak / 2**20:.1f} MiB ({peak / exact:.3f}x exact)", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "speed":
        speed(*(int(a) for a in sys.argv[2:]))
    else:
        memory()
