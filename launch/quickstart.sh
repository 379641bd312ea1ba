#!/usr/bin/env bash
# From a fresh machine with Python: set up, build the built-in corpus, train the tiny model.
#   bash launch/quickstart.sh [extra section.field=value overrides]
#
# Where it trains depends on the GPUs torch sees (CUDA_VISIBLE_DEVICES counts):
#   no GPU, or device=cpu among the overrides: 2 CPU ranks, context parallelism 2 (gloo)
#   1 GPU:       1 rank on it with parallel.cp_degree=1 (context parallelism needs 2 ranks, one GPU
#                each; `bash launch/quickstart.sh device=cpu` shows CP=2 on two CPU ranks instead)
#   2 or more:   2 ranks on GPUs 0 and 1, context parallelism 2 (NCCL)
#
# Knobs (environment variables):
#   PYTHON   interpreter that already has lh_dist's dependencies: skips the .venv setup
#   DATA     dataset folder (default runs/data/stdlib, built here with lh-data stdlib if missing)
#   RUN_DIR  run directory, emptied first (default runs/tiny-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  bash launch/setup.sh
  PYTHON=${VENV:-.venv}/bin/python
fi
DATA=${DATA:-runs/data/stdlib}
RUN_DIR=${RUN_DIR:-runs/tiny-cpu}
if [ ! -f "$DATA/lh_data.json" ]; then
  "$PYTHON" -m lh_dist.data.cli stdlib --out "$DATA"
fi

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
for arg in "$@"; do
  if [ "$arg" = device=cpu ]; then gpus=0; fi
done
layout=()
if [ "$gpus" = 0 ]; then
  nproc=2
  echo "quickstart: 2 CPU ranks, each holding half of every sequence (context parallelism 2, gloo)"
elif [ "$gpus" = 1 ]; then
  nproc=1
  layout=(parallel.cp_degree=1)
  echo "quickstart: 1 GPU, so 1 rank on it with parallel.cp_degree=1: context parallelism splits each"
  echo "  sequence over 2 or more ranks with a GPU each. For CP=2 on two CPU ranks: bash launch/quickstart.sh device=cpu"
else
  nproc=2
  echo "quickstart: $gpus GPUs, 2 ranks on GPUs 0 and 1, each holding half of every sequence (context parallelism 2, NCCL)"
fi

rm -rf "$RUN_DIR"  # a fresh demo run each time
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m lh_dist.train.cli \
  --config configs/tiny-cpu.yaml "data.path=$DATA" "logging.run_dir=$RUN_DIR" "${layout[@]}" "$@"
echo
echo "Done. Run directory: $RUN_DIR (config.yaml, checkpoints/, tensorboard/)"
tensorboard=tensorboard
if [[ $PYTHON == */* ]]; then tensorboard=$(dirname "$PYTHON")/tensorboard; fi
echo "Watch it: $tensorboard --logdir $RUN_DIR/tensorboard"
