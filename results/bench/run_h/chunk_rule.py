"""Run H's A/B: the batch walk keeping ``A [chunk, C_out, r*|K|]`` below a quarter of the
upstream gradient D (before) or below D itself (after), interleaved in one process.

Usage, from the repository root:
    python results/bench/run_h/chunk_rule.py speed ROUNDS [CASES]   # CASES 1: U-Net step, 2: and ResNet-18
    python results/bench/run_h/chunk_rule.py memory                 # step peaks, both rules, r = 4..32
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import bench_memory  # noqa: E402
import bench_speed  # noqa: E402
import xconv  # noqa: E402
from xconv import functional as F  # noqa: E402

RULES = {"quarter": lambda batch, pixels, columns: batch * pixels // (4 * columns),
         "whole": lambda batch, pixels, columns: batch * pixels // columns}


def speed(rounds, cases=1):
    for name, make, shape in bench_speed.scaled(bench_speed.STEPS[:cases], 1):
        torch.manual_seed(0)
        exact = bench_speed.step_timers(make, shape, 0, "cpu")[0]["total"]
        xc = bench_speed.step_timers(make, shape, 8, "cpu")[0]["total"]
        times = {"exact": [], **{k: [] for k in RULES}}
        for _ in range(rounds):
            times["exact"].append(bench_speed.median_seconds(exact, 1.0))
            for label, rule in RULES.items():
                F._batch_chunk = rule
                times[label].append(bench_speed.median_seconds(xc, 1.0))
        e = statistics.median(times["exact"])
        print(name, {k: f"{statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / e:.3f}x)" for k, v in times.items()})
        for label in RULES:
            ratios = [a / b for a, b in zip(times[label], times["exact"])]
            print(f"  per round {label}: median {statistics.median(ratios):.3f}", [round(x, 3) for x in ratios], flush=True)


def memory():
    for name in ("unet", "resnet18"):
        base, shape = bench_memory.MODELS[name]()
        torch.manual_seed(0)
        exact = bench_memory.step_peak(base, shape, "cpu")
        for r in (4, 8, 16, 32):
            for label, rule in RULES.items():
                F._batch_chunk = rule
                model = xconv.convert(bench_memory.MODELS[name]()[0], probes=r, relu=True)
                peak = bench_memory.step_peak(model, shape, "cpu")
                print(f"{name} r={r} {label}: step peak {peak / 2**20:.1f} MiB ({peak / exact:.3f}x exact)", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "speed":
        speed(*(int(a) for a in sys.argv[2:]))
    else:
        memory()
