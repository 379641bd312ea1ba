#!/usr/bin/env bash
# benchmarks/scaling.py and a 1M-token lh-train run on one GPU machine that has no package index:
# DeepSpeed and mosaicml-streaming travel as wheels in .whl/ (made by
# benchmarks/gpu_wheels.sh; carry it). Results land in $OUT and,
# for scaling.py, continue from the benchmarks/results/scaling.json of the working tree.
#
#   bash benchmarks/scaling_gpu.sh scaling [scaling.py options]   # e.g. --series dense --budget-s 500
#   bash benchmarks/scaling_gpu.sh train N STEPS [lh-train overrides]  # lh-train, configs/paper-270m-1m.yaml at N tokens
#
# train: STEPS steps of Lighthouse with 2 warmup steps (fewer if STEPS < 2), on a corpus built for N
# in /tmp/data/stdlib-N (its validation split holds one sample of N + 1 tokens); overrides such as
# schedule.warmup_steps=0 or checkpoint.interval=10 replace those defaults. Run dir: /tmp/runs/1m.
set -uo pipefail
OUT=${OUT:-/tmp/scaling_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "${1:-}" in
scaling)
    shift
    cp benchmarks/results/scaling.json "$OUT/" 2>/dev/null  # the cells measured so far are kept
    python3 benchmarks/scaling.py --out "$OUT" "$@"
    ;;
train)
    n=${2:?N}; steps=${3:?STEPS}; shift 3
    # A corpus per N: one validation sample of N + 1 tokens, and the standard library's text for training.
    data=/tmp/data/stdlib-$n
    [ -f "$data/lh_data.json" ] || python3 -m lh_dist.data.cli stdlib --out "$data" --val-tokens $((n + 2)) || exit 1
    # A schedule for STEPS steps, all Lighthouse; the overrides given after STEPS come later and win.
    schedule=("schedule.warmup_steps=$((steps < 2 ? steps : 2))" "schedule.lighthouse_steps=$steps")
    run=/tmp/runs/1m
    rm -rf "$run"
    /usr/bin/time -v python3 -m lh_dist.train.cli --config configs/paper-270m-1m.yaml data.path="$data" \
        data.seq_len="$n" logging.run_dir="$run" schedule.steps="$steps" "${schedule[@]}" "$@" 2> "$OUT/time.txt" | tee "$OUT/train.log"
    rc=${PIPESTATUS[0]}
    tail -25 "$OUT/time.txt"
    tar czf "$OUT/run.tar.gz" -C "$run" --exclude='checkpoints' --exclude='*.pt' . 2>/dev/null
    ls -la "$run" "$run"/checkpoints 2>/dev/null | head -20
    exit "$rc"
    ;;
*)
    echo "usage: bash benchmarks/scaling_gpu.sh scaling [options] | train N STEPS [overrides]" >&2
    exit 2
    ;;
esac
