#!/usr/bin/env bash
# All benchmarks on a CUDA machine in one call (about 5 minutes on one H200): operator
# profiles, speed at the default and at 8x batch sizes, memory, gradient quality. Every table,
# CSV and log goes under one folder (default results/bench/gpu, replacing what is there); a
# part that fails is reported and the others still run (exit status 1 if any failed).
# Usage: scripts/gpu_bench.sh [OUT_DIR]; PYTHON=python3 to use another interpreter than
# .venv/bin/python. Relative paths are taken from the current directory.
set -uo pipefail
py=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
case $py in */*)
    dir=$(cd -- "$(dirname -- "$py")" 2> /dev/null && pwd) || { echo "gpu_bench.sh: no folder for $py" >&2; exit 2; }
    py=$dir/$(basename -- "$py") ;;
esac
if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_bench.sh: $py sees no CUDA device; nothing was run" >&2
    exit 2
fi
out=${1:-$(dirname "$0")/../results/bench/gpu}
mkdir -p -- "$out" || exit 2
out=$(cd -- "$out" && pwd)
cd "$(dirname "$0")/.."
failed=()

part() {  # part NAME SCRIPT ARGS...: stdout to NAME.md (and the terminal), stderr to NAME.err
    local name=$1 start=$SECONDS
    shift
    "$py" "$@" 2> "$out/$name.err" | tee "$out/$name.md"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/parts.txt"
    if [ "$rc" != 0 ]; then
        failed+=("$name")
        tail -n 5 "$out/$name.err" >&2
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv"
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || true
: > "$out/parts.txt"
part profile scripts/bench_speed.py --probes 8 --profile
part speed scripts/bench_speed.py --rounds 3 --min-run-time 0.5 --csv "$out/speed.csv"
part speed_batch8x scripts/bench_speed.py --batch-scale 8 --probes 8 32 --rounds 2 --min-run-time 0.5 \
    --csv "$out/speed_batch8x.csv"
part memory scripts/bench_memory.py --budget-gb 16 --csv "$out/memory.csv"
part gradient scripts/gradient_quality.py --model unet --draws 8 --csv "$out/gradient.csv"
if [ ${#failed[@]} != 0 ]; then
    echo "failed: ${failed[*]} (see $out/<name>.err)" >&2
    exit 1
fi
