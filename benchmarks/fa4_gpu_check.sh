#!/usr/bin/env bash
# FlashAttention-4 on one GPU: install it from the wheel set of ../shared/tools/fa4-wheels.sh,
# then run the flash_attn GPU tests and the cudnn-vs-flash_attn benchmarks, results under $OUT.
# The wheels travel in two halves (.fa4a/, .fa4b/), so this runs as two calls on one warm machine:
#
#   bash benchmarks/fa4_gpu_check.sh part1            # with .fa4a/ present: keeps it in /tmp/fa4
#   bash benchmarks/fa4_gpu_check.sh part2 [COMMIT]   # with .fa4b/ present: installs and runs
#
# part2 spends at most FA4_BUDGET seconds (default 300) on its phases, most important first:
# the self-check, the flash_attn tests, the attention benchmark, the training-step benchmark, then
# the other attention GPU tests; a phase that no longer fits is skipped and says so. Each phase
# writes $OUT/<phase>.log; $OUT/summary.txt has one line per phase. The training benchmark times
# lh-train's step, so it needs DeepSpeed: with a .whl/ folder of wheels present (DeepSpeed and its
# pure-Python dependencies, for a machine without a package index) part2 installs them first.
# FA4_TRAIN_MODE (default selective+compile) is the step's checkpointing mode; EXTRA, a command
# run as one more phase before the other attention tests; FA4_PHASES, the phases to run (default
# all: selfcheck tests_flash_attn bench_attention bench_train extra tests_other).
set -uo pipefail
OUT=${OUT:-/tmp/fa4_out}
STAGE=/tmp/fa4
ALL_PHASES="selfcheck tests_flash_attn bench_attention bench_train extra tests_other"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

part1() {
    [ -d .fa4a ] || { echo "fa4_gpu_check: error: .fa4a/ is missing (carry it; fa4-wheels.sh makes it)"; exit 2; }
    rm -rf "$STAGE" && mkdir -p "$STAGE" && cp .fa4a/* "$STAGE"/ || exit 1
    du -sh "$STAGE"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
        "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(), torch.cuda.get_device_name())'
    python3 -c 'import deepspeed' 2>/dev/null && echo "deepspeed present" || echo "deepspeed absent (not needed)"
}

phase() {  # phase NAME MAX_SECONDS COMMAND...: run it within what is left of the budget
    local name=$1 limit=$2 left start rc
    shift 2
    [[ " ${FA4_PHASES:-$ALL_PHASES} " == *" $name "* ]] || return 0
    left=$((BUDGET - (SECONDS - T0)))
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        echo "$name: skipped (${left}s of the budget left)" | tee -a "$OUT/summary.txt"
        return
    fi
    echo "== $name (at most ${limit}s)"
    start=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $((SECONDS - start))s$( ((rc == 124)) && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}

part2() {
    local commit=${1:-unknown} libs
    [ -d "$STAGE" ] || { echo "fa4_gpu_check: error: $STAGE is missing: run part1 first, on the same warm machine"; exit 2; }
    [ -d .fa4b ] || { echo "fa4_gpu_check: error: .fa4b/ is missing (carry it)"; exit 2; }
    T0=$SECONDS
    BUDGET=${FA4_BUDGET:-300}
    : > "$OUT/summary.txt"
    libs=$(cat .fa4b/libs.name)
    cat "$STAGE/libs.part.aa" .fa4b/libs.part.ab > "$STAGE/$libs" || exit 1
    rm -rf "$STAGE/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STAGE/site" \
        "$STAGE"/*.whl .fa4b/*.whl || exit 1
    if [ -d .whl ] && ! python3 -c 'import deepspeed' 2>/dev/null && [ ! -d /tmp/site/deepspeed ]; then
        python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    fi
    echo "installed in $((SECONDS - T0))s" | tee -a "$OUT/summary.txt"
    # --target does not run the package's .pth file, which puts dsl_packages on the path
    export PYTHONPATH="$STAGE/site/nvidia_cutlass_dsl/dsl_packages:$STAGE/site:/tmp/site:$PWD"
    # compiled kernels persist on disk, so each benchmark process does not compile them again
    export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR="$STAGE/cache"

    phase selfcheck 120 python3 -c '
import time, torch
import lh_dist.ops.attention as a
from lh_dist.ops.attention import flash_attn4
t = time.perf_counter()
for dtype in (torch.bfloat16, torch.float16):
    print(dtype, "->", a.resolve_backend("auto", torch.device("cuda"), dtype, 128))
print("versions:", flash_attn4.flash_attn_version())
print(f"self-check (import, compile, both dtypes) {time.perf_counter() - t:.1f} s; verdicts:", flash_attn4._self_checks)'
    phase tests_flash_attn 180 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/unit/test_flash_attn_gpu.py tests/unit/test_flash_attn_selfcheck.py
    phase bench_attention 150 python3 benchmarks/attention.py --backends cudnn flash_attn \
        --lengths 32768 131072 524288 --max-dense-length 131072 --iters 5 --suffix _fa4 \
        --commit "$commit" --out-dir "$OUT"
    phase bench_train 200 python3 benchmarks/train_throughput.py --seq-lens 98304 --variants dense,lighthouse-2048 \
        --backends cudnn,flash_attn --modes "${FA4_TRAIN_MODE:-selective+compile}" --warmup 0 --steps 2 --profile \
        --name train_throughput_fa4 --commit "$commit" --out "$OUT"
    [ -n "${EXTRA:-}" ] && phase extra 150 bash -c "$EXTRA"
    phase tests_other 150 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/unit/test_attention_ops.py tests/unit/test_ring_attention.py
    echo "== summary ($((SECONDS - T0))s)"
    cat "$OUT/summary.txt"
}

case "${1:-}" in
    part1) part1 ;;
    part2) shift; part2 "$@" ;;
    *) echo "usage: bash benchmarks/fa4_gpu_check.sh part1 | part2 [COMMIT]" >&2; exit 2 ;;
esac
