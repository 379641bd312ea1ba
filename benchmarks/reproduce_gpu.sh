#!/usr/bin/env bash
# benchmarks/reproduce.py on one GPU machine that has no package index: one training per call, each
# with its evaluations under 9 minutes. DeepSpeed and mosaicml-streaming travel as wheels in .whl/
# (made by benchmarks/gpu_wheels.sh; carry it). The code corpus and the retrieval set are built from
# the machine's own site-packages into /tmp/reproduce/data (about a minute), and kept while the
# machine stays warm; the same image builds the same corpus, which each run records by content hash.
#
#   bash benchmarks/reproduce_gpu.sh NAME FRACTION SEED [reproduce.py train options] [lh-train overrides]
#   e.g. bash benchmarks/reproduce_gpu.sh dense-s0 0 0
#        bash benchmarks/reproduce_gpu.sh lh60-s0 0.6 0
#
# The run's results folder comes back as $OUT/NAME.tar.gz; unpack it here into
# benchmarks/results/reproduction_v2/ and write the report over every run there:
#   tar xzf NAME.tar.gz -C benchmarks/results/reproduction_v2
#   python benchmarks/reproduce.py report --results benchmarks/results/reproduction_v2 \
#       --notes benchmarks/results/reproduction_v2_notes.md
set -uo pipefail
OUT=${OUT:-/tmp/reproduce_out}
ROOT=/tmp/reproduce
mkdir -p "$OUT" "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
name=${1:?usage: bash benchmarks/reproduce_gpu.sh NAME FRACTION SEED [options]}
fraction=${2:?FRACTION}
seed=${3:?SEED}
shift 3
[ -d .whl ] || { echo "reproduce_gpu: error: .whl/ is missing (make it with benchmarks/gpu_wheels.sh and carry it)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 benchmarks/reproduce.py train "$name" --lighthouse-fraction "$fraction" --seed "$seed" \
    --data "$ROOT/data/pycode" --retrieval-data "$ROOT/data/retrieval-64k" \
    --results "$ROOT/results" --work "$ROOT/work" "$@" 2>&1 | tee "$OUT/$name.log"
rc=${PIPESTATUS[0]}
[ -d "$ROOT/results/$name" ] && tar czf "$OUT/$name.tar.gz" --exclude=.index.lock -C "$ROOT/results" "$name"
exit "$rc"
