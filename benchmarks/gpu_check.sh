#!/usr/bin/env bash
# Every GPU measurement of issue 15 in one run, within a time budget, from the source tree.
#
#   OUT=/path/for/results bash benchmarks/gpu_check.sh        # BUDGET_S=540 by default
#
# Runs on a machine with its own torch (no install): PYTHONPATH=. from the repository root.
# Steps, each with its own timeout cut to the time left, so a slow step cannot eat the
# others' time and what was measured is kept (each step's log and rc under $OUT):
#   1. cuda_tests   the CUDA tests: CPU = CUDA for thresholds, tallies, top images, losses, gradients
#   2. dissect_8k   benchmarks/dissect_speed.py at 8,192 images: cold, warm, bare, host syncs per batch
#   3. cgl_overhead benchmarks/cgl_overhead.py --arch alexnet --batch 128 --device cuda (fp32, then bf16)
#   4. dissect_63k  benchmarks/dissect_speed.py at 63,305 images (Broden's size): cold, warm, bare
#   5. demo_full    dissect demo --full --seeds 3, with whatever time is left (its table if it finishes)
# Steps 2 and 4 write JSON with every figure (dissect_*.json); summary.txt collects the tails.
set -u
OUT=${OUT:-/tmp/gpu_check}
BUDGET_S=${BUDGET_S:-540}
WORK=${WORK:-/tmp/gpu_check_work}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT" "$WORK"
start=$(date +%s)

left() { echo $((BUDGET_S - ($(date +%s) - start))); }

# step NAME CAP_SECONDS COMMAND...: run under min(CAP, time left); skip when under 30 s is left
step() {
    local name=$1 cap=$2 t
    shift 2
    t=$(left)
    ((t > cap)) && t=$cap
    if ((t < 30)); then
        echo "$name: skipped, $(left) s of the budget left" | tee -a "$OUT/summary.txt"
        echo skipped >"$OUT/$name.rc"
        return
    fi
    echo "== $name (timeout $t s, $(left) s left)" | tee -a "$OUT/summary.txt"
    local t0=$(date +%s)
    timeout -k 10 "$t" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$OUT/$name.rc"
    local why=""
    ((rc == 124 || rc == 137)) && why=", timed out"
    { echo "$name: rc $rc$why, $(($(date +%s) - t0)) s"
      tail -n 30 "$OUT/$name.log"; echo; } | tee -a "$OUT/summary.txt"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv 2>&1 || true
    nproc; free -g | head -2; df -h /tmp | tail -1
    $PY -c 'import torch, torchvision, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda,
"torchvision", torchvision.__version__, "numpy", numpy.__version__, "device", torch.cuda.get_device_name(0))'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >"$OUT/summary.txt"

step cuda_tests 150 $PY -m pytest -q -p no:cacheprovider -o faulthandler_timeout=140 -rs \
    tests/test_stats.py tests/test_pipeline.py tests/test_losses.py -k cuda
step dissect_8k 150 $PY benchmarks/dissect_speed.py --n 8192 --pool 1024 --repeat 1 --device cuda \
    --batch-size 128 --dir "$WORK/ds8k" --sync-check 512 --json "$OUT/dissect_8k.json"
step cgl_overhead 90 bash -c "$PY benchmarks/cgl_overhead.py --arch alexnet --batch 128 --device cuda &&
    $PY benchmarks/cgl_overhead.py --arch alexnet --batch 128 --device cuda --amp"
rm -rf "$WORK/ds8k"  # disk: the 63k set and its decoded cache need about 15 GB
step dissect_63k 240 $PY benchmarks/dissect_speed.py --n 63305 --pool 1024 --repeat 1 --device cuda \
    --batch-size 128 --dir "$WORK/ds63k" --phases cold,warm,bare --json "$OUT/dissect_63k.json"
rm -rf "$WORK/ds63k"
step demo_full 600 $PY -m dissect demo --full --seeds 3 --device cuda --out "$WORK/demo-full" --no-report --quiet
# what the demo finished, even when it ran out of time: its table and the runs' logs (no checkpoints)
if [ -d "$WORK/demo-full" ]; then
    mkdir -p "$OUT/demo-full"
    (cd "$WORK/demo-full" && find . \( -name 'table1*' -o -name 'log.jsonl' -o -name 'summary.json' \
        -o -name '*.md' \) -size -2M -print0 | xargs -0 -r cp --parents -t "$OUT/demo-full")
fi
echo "total $(($(date +%s) - start)) s of a $BUDGET_S s budget" | tee -a "$OUT/summary.txt"
