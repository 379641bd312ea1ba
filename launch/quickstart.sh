#!/usr/bin/env bash
# From a fresh machine with Python: set up, build the built-in corpus, train the tiny model on two CPU ranks.
#   bash launch/quickstart.sh [extra section.field=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${VENV:-.venv}
DATA=runs/data/stdlib
if [ ! -f "$DATA/lh_data.json" ]; then
  "$VENV/bin/lh-data" stdlib --out "$DATA"
fi
rm -rf runs/tiny-cpu  # a fresh demo run each time
"$VENV/bin/torchrun" --standalone --nproc-per-node 2 -m lh_dist.train.cli \
  --config configs/tiny-cpu.yaml "$@"
echo
echo "Done. Run directory: runs/tiny-cpu (config.yaml, checkpoints/, tensorboard/)"
echo "Watch it: $VENV/bin/tensorboard --logdir runs/tiny-cpu/tensorboard"
