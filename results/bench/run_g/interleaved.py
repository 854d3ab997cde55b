"""Run G's A/B: the code before and after 0b39ea4 + 802eec9, interleaved in one process.

"Before" is the input gradient by the transposed conv everywhere and the 1-bit ReLU's backward by
``torch.where`` (as at 2cf6ef1); "after" is the code in the checkout. Each round times exact,
before and after in turn (``bench_speed.median_seconds``), so machine load hits all three alike.
Prints the medians and every round's ratio to exact. Usage, from the repository root:
    python results/bench/run_g/interleaved.py layers 8     # 64->64 layer, 8 rounds
    python results/bench/run_g/interleaved.py steps 10 1   # U-Net step, 10 rounds (2: and ResNet-18)
"""
import statistics
import sys
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import bench_speed  # noqa: E402
from xconv import functional as F  # noqa: E402


def input_grad_before(grad_out, input_shape, weight, geom):
    stride, padding, dilation, transposed, _, groups = geom.conv_args()
    if transposed:
        return torch.ops.aten.convolution(grad_out, weight, None, stride, padding, dilation, False,
                                          [0] * len(stride), groups)
    out_pad = [x - ((y - 1) * s - 2 * p + d * (k - 1) + 1) for x, y, s, p, d, k in
               zip(input_shape[2:], grad_out.shape[2:], stride, padding, dilation, weight.shape[2:])]
    return torch.ops.aten.convolution(grad_out, weight, None, stride, padding, dilation, True, out_pad, groups)


def bit_backward_before(ctx, grad_y):
    (packed,) = ctx.saved_tensors
    mask = F.unpack_bits(packed, ctx.shape)
    if not ctx.negative_slope:  # ReLU: 0 then, None since 84cc8f0
        return torch.where(mask, grad_y, 0.0), None, None
    return torch.where(mask, grad_y, grad_y * ctx.negative_slope), None, None


AFTER = (F._input_grad, F.BitLeakyReLUFunction.__dict__["backward"])
BEFORE = (input_grad_before, staticmethod(once_differentiable(bit_backward_before)))


def use(version):
    F._input_grad, F.BitLeakyReLUFunction.backward = version


def main(kind, rounds, cases=1):
    cases_, make_timers = (bench_speed.LAYERS, bench_speed.layer_timers) if kind == "layers" else \
        (bench_speed.STEPS, bench_speed.step_timers)
    for name, make, shape in bench_speed.scaled(cases_[:cases], 1):
        torch.manual_seed(0)
        exact = make_timers(make, shape, 0, "cpu")[0]["total"]
        xconv_fn = make_timers(make, shape, 8, "cpu")[0]["total"]
        times = {"exact": [], "before": [], "after": []}
        for _ in range(rounds):
            times["exact"].append(bench_speed.median_seconds(exact, 1.0))
            for label, version in (("before", BEFORE), ("after", AFTER)):
                use(version)
                times[label].append(bench_speed.median_seconds(xconv_fn, 1.0))
        use(AFTER)
        e = statistics.median(times["exact"])
        print(name, {k: f"{statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / e:.3f}x)" for k, v in times.items()})
        for label in ("before", "after"):
            print(f"  per round {label}", [round(a / b, 3) for a, b in zip(times[label], times["exact"])], flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(int(a) for a in sys.argv[3:]))
