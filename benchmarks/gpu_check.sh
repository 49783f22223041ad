#!/usr/bin/env bash
# One CUDA GPU (H100 / H200): every CUDA test and the GPU benchmarks, in under 10 minutes, then one
# summary. Each step has a time limit (the sum stays under 10 minutes); logs go to $GPU_CHECK_LOG.
# Without CUDA it says so and exits 0.
#
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device on this machine: skipped"
    exit 0
fi
LOG=${GPU_CHECK_LOG:-/tmp/graphgen-gpu-check}
WORK=${GRAPHGEN_BENCH_DIR:-/tmp/graphgen-bench}
mkdir -p "$LOG" "$WORK"
SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS command...: run with a time limit, keep its log, note the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
    local rc=$? took=$((SECONDS - t0))
    local what
    case $rc in
        0) what="ok" ;;
        124|137) what="TIMED OUT after ${limit}s"; FAILED=1 ;;
        *) what="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    SUMMARY+=("$(printf '%-22s %-26s %4ss   %s' "$name" "$what" "$took" "$(summarise "$name")")")
}

summarise() {  # the line of a log that says what came out
    case $1 in
        tests) grep -E '[0-9]+ (passed|failed|error)' "$LOG/$1.log" | tail -1 ;;
        bench_*) grep -E 'ratio graphgen / HF|graphgen \(async' "$LOG/$1.log" | tr -s ' ' | paste -sd ';' ;;
    esac
}

echo "gpu_check: $(python -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)')"
echo "logs: $LOG"
# every test marked gpu (tests/executors/test_cuda.py, the CUDA paths of the oracle tests)
step tests 240 python -m pytest -q -m gpu tests
# FlexGen's setting on one GPU: OPT-1.3B with a 1 GB GPU budget, the rest of the weights in pinned
# host RAM, against HF Accelerate with the same budget; then the same with the KV cache on the host
# and decode attention on the CPU (policy.cpu_attention)
step bench_gpu_offload 150 python benchmarks/bench_gpu.py --model opt-1.3b --gpu-mem 1GB --hf-batches 1,8 \
    --gbs 16 --num-batches 2 --prompt-len 256 --gen-len 16 --work-dir "$WORK"
step bench_gpu_cpu_attn 120 python benchmarks/bench_gpu.py --model opt-1.3b --gpu-mem 1GB --skip-hf \
    --gbs 16 --num-batches 2 --prompt-len 256 --gen-len 16 --cpu-attention --work-dir "$WORK"

echo
echo "=== gpu_check summary ($(date -u +%H:%M:%SZ)) ==="
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
