#!/usr/bin/env bash
# Launch lh-train through torchrun on one node or many (run this once on every node).
#
#   bash launch/run.sh [section.field=value ...]
#
# Knobs (environment variables):
#   CONFIG          YAML run file (default configs/tiny-cpu.yaml)
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes per node (default: one per visible GPU; 2 without GPUs or with device=cpu)
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0); node 0 hosts the rendezvous store
#   RDZV_ENDPOINT   host:port on node 0, reachable from every node (needed when NNODES > 1;
#                   one node without it rendezvouses on a free local port)
#   RDZV_ID         rendezvous name shared by the nodes of one run (default lh_dist)
#   LOG_DIR         if set, torchrun writes each rank's stdout/stderr under it and tees them here
#   STOP_TIMEOUT    seconds torchrun gives its workers to checkpoint after SIGTERM before killing
#                   them (default 300; torchrun's own default is 30)
#   RESUME          auto (default: continue from the newest complete checkpoint), none, or a folder
#   PYTHON          interpreter with lh_dist installed (default .venv/bin/python, else python3)
#   DRY_RUN=1       validate the config and the DP x CP layout for NNODES * NPROC_PER_NODE ranks,
#                   print the plan, and exit without starting any process group
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RDZV_ID=${RDZV_ID:-lh_dist}
RESUME=${RESUME:-auto}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
positive() {  # NAME VALUE: exit 2 with one line unless VALUE is a positive integer
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: $1 must be a positive integer, got '$2'" >&2; exit 2; }
}
positive NNODES "$NNODES"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] ||
  { echo "run.sh: NODE_RANK must be in 0..$((NNODES - 1)) (NNODES=$NNODES), got '$NODE_RANK'" >&2; exit 2; }
if [ -z "${NPROC_PER_NODE:-}" ]; then
  # The trainer's own rule: one rank per GPU that torch sees (CUDA_VISIBLE_DEVICES counts), else 2 CPU ranks.
  NPROC_PER_NODE=$("$PYTHON" -m lh_dist.train.cli --config "$CONFIG" --ranks-per-node "$@")
fi
positive NPROC_PER_NODE "$NPROC_PER_NODE"
WORLD=$((NNODES * NPROC_PER_NODE))

if [ "${DRY_RUN:-0}" = 1 ]; then
  plan=$("$PYTHON" -m lh_dist.train.cli --config "$CONFIG" --dry-run --json --world-size "$WORLD" "$@")
  plan_field() { "$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$plan" "$1"; }
  if [ -n "${RDZV_ENDPOINT:-}" ]; then
    rendezvous="c10d at $RDZV_ENDPOINT"
  elif [ "$NNODES" -gt 1 ]; then
    rendezvous="c10d at RDZV_ENDPOINT (set it to host:port of node 0 to launch)"
  else
    rendezvous="c10d at a free local port"
  fi
  echo "launch: $NNODES node(s) x $NPROC_PER_NODE process(es) = world size $WORLD; rendezvous $rendezvous"
  for ((n = 0; n < NNODES; n++)); do
    echo "node $n: ranks $((n * NPROC_PER_NODE))..$(((n + 1) * NPROC_PER_NODE - 1))"
  done
  plan_field text
  # Ring attention sends K/V around each CP group every layer: keep the groups inside a node (NVLink).
  cp=$(plan_field cp_degree)
  if [ "$((NPROC_PER_NODE % cp))" = 0 ]; then
    echo "CP groups stay inside one node"
  else
    echo "warning: CP groups of $cp ranks span nodes ($NPROC_PER_NODE per node): ring traffic crosses the network"
  fi
  exit 0
fi

if [ -z "${RDZV_ENDPOINT:-}" ] && [ "$NNODES" -gt 1 ]; then
  echo "run.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port of node 0" >&2
  exit 2
fi
export PET_SHUTDOWN_TIMEOUT=${STOP_TIMEOUT:-300}  # read by torchrun as --shutdown-timeout
# Failures are not retried in place: a restart goes through the checkpoint (a requeue or a rerun).
args=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts 0)
if [ -z "${RDZV_ENDPOINT:-}" ]; then
  args+=(--standalone)
else
  args+=(--node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
fi
if [ "$NNODES" -gt 1 ]; then
  # With c10d, ranks are assigned at rendezvous; say explicitly which node serves the store
  # instead of relying on torchrun matching the endpoint to this machine's hostname.
  args+=(--rdzv-conf "is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)")
fi
if [ -n "${LOG_DIR:-}" ]; then
  mkdir -p "$LOG_DIR"
  args+=(--log-dir "$LOG_DIR" --tee 3)
fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" \
  -m lh_dist.train.cli --config "$CONFIG" --resume "$RESUME" "$@"
