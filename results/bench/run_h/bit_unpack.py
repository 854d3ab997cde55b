"""Run H's A/B of the 1-bit ReLU's backward: the mask unpacked whole to bool and cast a few
samples at a time (before, as at 817da41) or unpacked a few samples at a time straight into the
gradient's dtype (after, the checkout), interleaved in one process with exact.

Usage, from the repository root:
    python results/bench/run_h/bit_unpack.py ROUNDS [CASES]   # CASES 1: U-Net step, 2: and ResNet-18
"""
import math
import statistics
import sys
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import bench_speed  # noqa: E402
from xconv import functional as F  # noqa: E402


def backward_before(ctx, grad_y):
    (packed,) = ctx.saved_tensors
    shape = ctx.shape if len(ctx.shape) else (1,)
    mask, grad = F.unpack_bits(packed, shape), grad_y.reshape(shape)
    grad_x = torch.empty_like(grad)
    step = max(1, F.SIGN_CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    for b0 in range(0, shape[0], step):
        rows = slice(b0, b0 + step)
        sign = mask[rows].to(grad.dtype)
        if ctx.negative_slope is None:
            torch.ops.aten.threshold_backward.grad_input(grad[rows], sign, 0, grad_input=grad_x[rows])
        else:
            torch.ops.aten.leaky_relu_backward.grad_input(grad[rows], sign, ctx.negative_slope, False,
                                                          grad_input=grad_x[rows])
    return grad_x.view(grad_y.shape), None, None


VERSIONS = {"before": staticmethod(once_differentiable(backward_before)),
            "after": F.BitLeakyReLUFunction.__dict__["backward"]}


def main(rounds, cases=1):
    for name, make, shape in bench_speed.scaled(bench_speed.STEPS[:cases], 1):
        torch.manual_seed(0)
        exact = bench_speed.step_timers(make, shape, 0, "cpu")[0]["total"]
        xc = bench_speed.step_timers(make, shape, 8, "cpu")[0]["total"]
        times = {"exact": [], **{k: [] for k in VERSIONS}}
        for _ in range(rounds):
            times["exact"].append(bench_speed.median_seconds(exact, 1.0))
            for label, backward in VERSIONS.items():
                F.BitLeakyReLUFunction.backward = backward
                times[label].append(bench_speed.median_seconds(xc, 1.0))
        e = statistics.median(times["exact"])
        print(name, {k: f"{statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / e:.3f}x)" for k, v in times.items()})
        for label in VERSIONS:
            ratios = [a / b for a, b in zip(times[label], times["exact"])]
            print(f"  per round {label}: median {statistics.median(ratios):.3f}", [round(x, 3) for x in ratios], flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
