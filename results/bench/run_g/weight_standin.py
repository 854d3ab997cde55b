"""A/B of a669b28: the decompress order's weight-gradient kernel given a zero-stride stand-in
(before) or the layer's weight (after), interleaved in one process. Usage, from the repository
root: python results/bench/run_g/weight_standin.py ROUNDS [CASES]  (CASES 1: U-Net step, 2: and
ResNet-18). Output of 8 rounds in interleaved.txt."""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import bench_speed  # noqa: E402
from xconv import functional as F  # noqa: E402
new = F._weight_grad
def old(grad_out, inp, weight, geom, groups):
    shape = weight.shape if isinstance(weight, torch.Tensor) else weight
    return new(grad_out, inp, tuple(shape), geom, groups)
for name, make, shape in bench_speed.scaled(bench_speed.STEPS[:int(sys.argv[2]) if len(sys.argv) > 2 else 1], 1):
    torch.manual_seed(0)
    ex = bench_speed.step_timers(make, shape, 0, "cpu")[0]["total"]
    xc = bench_speed.step_timers(make, shape, 8, "cpu")[0]["total"]
    r = {"exact": [], "stand-in": [], "weight": []}
    for _ in range(int(sys.argv[1])):
        r["exact"].append(bench_speed.median_seconds(ex, 1.0))
        F._weight_grad = old; r["stand-in"].append(bench_speed.median_seconds(xc, 1.0))
        F._weight_grad = new; r["weight"].append(bench_speed.median_seconds(xc, 1.0))
    e = statistics.median(r["exact"])
    print(name, {k: f"{statistics.median(v)*1e3:.1f} ms ({statistics.median(v)/e:.3f}x)" for k, v in r.items()}, flush=True)
    for k in ("stand-in", "weight"):
        print(f"  per round {k}", [round(a / b, 3) for a, b in zip(r[k], r["exact"])], flush=True)
