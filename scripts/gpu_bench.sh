#!/usr/bin/env bash
# All benchmarks on a CUDA machine in one call (about 5-8 minutes on one GPU); every table
# and CSV goes under one folder. Usage: scripts/gpu_bench.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/bench/gpu}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv"
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || true
"$py" scripts/bench_memory.py --budget-gb 16 --csv "$out/memory.csv" | tee "$out/memory.md"
"$py" scripts/bench_speed.py --rounds 3 --min-run-time 0.5 --csv "$out/speed.csv" | tee "$out/speed.md"
"$py" scripts/gradient_quality.py --model unet --draws 8 --csv "$out/gradient.csv" | tee "$out/gradient.md"
