#!/usr/bin/env bash
# What a lent GPU should measure, in one call: training-step time of exact vs XConv (r=8, r=32)
# and SR storage (8 and 4 bits), eagerly and compiled (inductor; inductor with CUDA graphs, mode
# reduce-overhead), for U-Net(resnet18) at 128x128, batch 8 and 64, and ResNet-18 at 32x32,
# batch 64 and 512, as ratios measured side by side in one process, each with its CUDA peak
# memory; then one table of single layers (scripts/bench_speed.py does the timing).
#
# Parts run in order of importance under a time budget (BENCH_BUDGET_S seconds, default 450, so
# the call ends within 8 minutes): each part may use what is left; one that would start with under
# 30 s left is skipped. A part that fails or is skipped is reported and the others still run
# (exit status 1 if any failed or was skipped). Every table, CSV and log goes under OUT_DIR
# (default results/bench/gpu/<device name>), with device.csv and commit.txt.
#
# Usage: scripts/gpu_bench.sh [--device cpu] [OUT_DIR]
#   --device cpu: the same parts on the CPU at batch 2 and a quarter of each image size
#   (bench_speed.py --small), one short round each: checks, on a machine without a GPU, that the
#   call runs end to end. The numbers mean nothing.
# COMPILE_BACKEND=aot_eager replaces inductor (a CPU check without inductor's C++ compile time);
# BENCH_PARTS="steps layers" runs only those parts (default: steps steps_batch8x steps_cudagraphs
# layers); PYTHON=python3 uses another interpreter than .venv/bin/python. Relative paths are taken
# from the current directory.
set -uo pipefail
device=cuda
if [ "${1:-}" = --device ]; then
    device=${2:-}
    shift 2 || { echo "gpu_bench.sh: --device needs a value: cpu or cuda" >&2; exit 2; }
fi
case $device in cpu|cuda) ;; *) echo "gpu_bench.sh: --device must be cpu or cuda, got '$device'" >&2; exit 2;; esac
if [ $# -gt 1 ] || [[ ${1:-} == -* ]]; then
    echo "gpu_bench.sh: usage: scripts/gpu_bench.sh [--device cpu|cuda] [OUT_DIR]; got: $*" >&2
    exit 2
fi
all_parts="steps steps_batch8x steps_cudagraphs layers"
for name in ${BENCH_PARTS:-$all_parts}; do
    [[ " $all_parts " == *" $name "* ]] || { echo "gpu_bench.sh: BENCH_PARTS must name parts among: $all_parts; got '$name'" >&2; exit 2; }
done
py=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
case $py in */*)
    dir=$(cd -- "$(dirname -- "$py")" 2> /dev/null && pwd) || { echo "gpu_bench.sh: no folder for $py" >&2; exit 2; }
    py=$dir/$(basename -- "$py") ;;
esac
if [ "$device" = cuda ]; then
    if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_bench.sh: $py sees no CUDA device; nothing was run (--device cpu checks the call on the CPU)" >&2
        exit 2
    fi
    name=$("$py" -c "import torch; print(torch.cuda.get_device_name())" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9.-')
    timing=(--rounds 2 --min-run-time 0.3)
else
    name=cpu
    timing=(--small --rounds 1 --min-run-time 0.05)
fi
backend=${COMPILE_BACKEND:-inductor}
if ! "$py" -c "import sys, torch; sys.exit(sys.argv[1] not in torch.compiler.list_backends(exclude_tags=()))" "$backend"; then
    echo "gpu_bench.sh: COMPILE_BACKEND must be one of torch.compiler.list_backends(exclude_tags=()); got '$backend'" >&2
    exit 2
fi
budget=${BENCH_BUDGET_S:-450}
selected=" ${BENCH_PARTS:-$all_parts} "
out=${1:-$(dirname "$0")/../results/bench/gpu/$name}
mkdir -p -- "$out" || exit 2
out=$(cd -- "$out" && pwd)
cd "$(dirname "$0")/.."
failed=()
start_all=$SECONDS

part() {  # part NAME SCRIPT ARGS...: stdout to NAME.md (and the terminal), stderr to NAME.err
    local name=$1 start=$SECONDS left=$((budget - SECONDS + start_all))
    shift
    [[ $selected == *" $name "* ]] || return 0
    if [ "$left" -lt 30 ]; then
        echo "$name: skipped, ${left} s of the ${budget} s budget left" | tee -a "$out/parts.txt"
        failed+=("$name")
        return
    fi
    timeout "$left" "$py" "$@" --device "$device" 2> "$out/$name.err" | tee "$out/$name.md"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/parts.txt"
    if [ "$rc" != 0 ]; then
        failed+=("$name")
        tail -n 5 "$out/$name.err" >&2
    fi
}

if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv"
else
    "$py" -c "import platform, torch; print('name,threads'); print(f'{platform.processor() or platform.machine()},{torch.get_num_threads()}')" \
        > "$out/device.csv"
fi
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || true
: > "$out/parts.txt"
steps=(scripts/bench_speed.py --only steps --probes 8 32 --storage-bits 8 4 --compile none "$backend" "${timing[@]}")
part steps "${steps[@]}" --csv "$out/steps.csv"
part steps_batch8x "${steps[@]}" --batch-scale 8 --csv "$out/steps_batch8x.csv"
part steps_cudagraphs scripts/bench_speed.py --only steps --probes 8 --storage-bits 4 --compile "$backend" \
    --compile-mode reduce-overhead "${timing[@]}" --csv "$out/steps_cudagraphs.csv"
part layers scripts/bench_speed.py --only layers --probes 8 32 --storage-bits 4 --compile none "$backend" \
    "${timing[@]}" --csv "$out/layers.csv"
if [ ${#failed[@]} != 0 ]; then
    echo "failed or skipped: ${failed[*]} (see $out/<name>.err and parts.txt)" >&2
    exit 1
fi
