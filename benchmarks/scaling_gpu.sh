#!/usr/bin/env bash
# benchmarks/scaling.py and a 1M-token lh-train run on one GPU machine that has no package index:
# DeepSpeed and mosaicml-streaming travel as wheels in .whl/ (carry it). Results land in $OUT and,
# for scaling.py, continue from the benchmarks/results/scaling.json of the working tree.
#
#   bash benchmarks/scaling_gpu.sh scaling [scaling.py options]   # e.g. --series dense --budget-s 500
#   bash benchmarks/scaling_gpu.sh train N STEPS [lh-train overrides]  # lh-train, configs/paper-270m-1m.yaml at N tokens
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
    data=/tmp/data/stdlib
    # One validation sample of N + 1 tokens, and enough training text for `steps` samples.
    [ -f "$data/lh_data.json" ] || python3 -m lh_dist.data.cli stdlib --out "$data" --val-tokens $((n + 2)) || exit 1
    run=/tmp/runs/1m
    rm -rf "$run"
    /usr/bin/time -v python3 -m lh_dist.train.cli --config configs/paper-270m-1m.yaml data.path="$data" \
        data.seq_len="$n" logging.run_dir="$run" schedule.steps="$steps" "$@" 2> "$OUT/time.txt" | tee "$OUT/train.log"
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
