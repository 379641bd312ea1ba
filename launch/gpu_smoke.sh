#!/usr/bin/env bash
# Check on a GPU machine what README.md (and docs/launching.md) say about one GPU, end to end:
#   bash launch/gpu_smoke.sh
# Uses GPU 0 only (CUDA_VISIBLE_DEVICES=0 unless set); needs no network; about 2-3 minutes.
# Prints one "ok" or "FAIL" line per claim and exits with the number of failures.
#
# Knobs (environment variables):
#   PYTHON     interpreter with lh_dist's dependencies (default .venv/bin/python, else python3)
#   SMOKE_DIR  run directories and logs (default runs/gpu-smoke; emptied first)
#   PAPER=0    skip the few steps of configs/paper-530m-98k.yaml
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} PYTHONUNBUFFERED=1
SMOKE_DIR=${SMOKE_DIR:-runs/gpu-smoke}
rm -rf "$SMOKE_DIR"
mkdir -p "$SMOKE_DIR"
failures=0
ok() { echo "  ok    $*"; }
fail() { echo "  FAIL  $*"; failures=$((failures + 1)); }
# expect DESCRIPTION FILE TEXT: the file holds the text.
expect() { if grep -qF -- "$3" "$2"; then ok "$1"; else fail "$1 (no '$3' in $2)"; fi; }
# scalars RUN_DIR TAG STEP...: the TensorBoard values of TAG at those steps ("missing" if not logged).
scalars() {
  "$PYTHON" - "$@" <<'EOF'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1] + "/tensorboard"); acc.Reload()
values = {e.step: e.value for e in acc.Scalars(sys.argv[2])}
print(" ".join(f"{values[int(s)]:.1f}" if int(s) in values else "missing" for s in sys.argv[3:]))
EOF
}
# near MEASURED CLAIMED: within 25% of the README's figure.
near() { "$PYTHON" -c "import sys; m, c = map(float, sys.argv[1:]); sys.exit(not abs(m / c - 1) <= 0.25)" "$1" "$2" 2>/dev/null; }

echo "== machine"
"$PYTHON" -c "import torch; print(f'torch {torch.__version__}, CUDA build {torch.version.cuda}, ' \
  f'{torch.cuda.device_count()} visible GPU(s): {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" = 1 ]; then ok "torch sees exactly one GPU"; else fail "torch sees $gpus GPUs, not 1"; fi

echo "== launch/run.sh starts one rank per visible GPU"
DRY_RUN=1 bash launch/run.sh parallel.cp_degree=1 >"$SMOKE_DIR/run-dry.log" 2>&1
expect "run.sh's default NPROC_PER_NODE is 1" "$SMOKE_DIR/run-dry.log" "1 node(s) x 1 process(es)"

echo "== quick start on one GPU: bash launch/quickstart.sh"
start=$(date +%s)
RUN_DIR=$SMOKE_DIR/quickstart bash launch/quickstart.sh >"$SMOKE_DIR/quickstart.log" 2>&1
rc=$?
echo "  $(($(date +%s) - start)) s, exit $rc (log: $SMOKE_DIR/quickstart.log)"
if [ "$rc" = 0 ]; then ok "quickstart exits 0"; else fail "quickstart exits $rc"; fi
expect "it says why it runs one rank" "$SMOKE_DIR/quickstart.log" "quickstart: 1 GPU, so 1 rank on it with parallel.cp_degree=1"
expect "one rank, no CP" "$SMOKE_DIR/quickstart.log" "world 1 = dp 1 x cp 1"
expect "on the GPU" "$SMOKE_DIR/quickstart.log" "device cuda:0"
last=$(grep -E '^step +60/60' "$SMOKE_DIR/quickstart.log" | tail -n 1)
echo "  last step: $last"
loss=$(sed -n 's/.* loss \([0-9.]*\) .*/\1/p' <<<"$last")
if [ -n "$loss" ] && "$PYTHON" -c "import sys; sys.exit(not float('$loss') < 3.3)"; then
  ok "all 60 steps, final training loss $loss (README: near 2.9)"
else
  fail "final training loss '${loss:-missing}' (README: near 2.9)"
fi
tok=$(scalars "$SMOKE_DIR/quickstart" perf/tokens_per_s 20 30 40 50 60 2>/dev/null)
echo "  tokens/s at steps 20..60: $tok"
median=$(tr ' ' '\n' <<<"$tok" | sort -n | sed -n 3p)
if [ -n "$median" ] && near "$median" 60000; then ok "about 60k tokens/s (median $median)"; else
  fail "median tokens/s '${median:-missing}' is not within 25% of README's 60k"; fi

echo "== lh-eval on the GPU"
"$PYTHON" -m lh_dist.eval.cli loss "$SMOKE_DIR/quickstart" --batches 2 >"$SMOKE_DIR/eval.log" 2>&1
expect "lh-eval loss runs" "$SMOKE_DIR/eval.log" "validation loss"
expect "lh-eval records its device" "$SMOKE_DIR/quickstart/eval/step_00000060/loss-dense-batches2x1.json" '"device": "cuda:0"'

echo "== two ranks on one GPU stop with one line"
start=$(date +%s)
timeout 300 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m lh_dist.train.cli \
  --config configs/tiny-cpu.yaml logging.run_dir="$SMOKE_DIR/two-ranks" >"$SMOKE_DIR/two-ranks.log" 2>&1
rc=$?
echo "  $(($(date +%s) - start)) s, exit $rc"
grep -F "lh-train: config error" "$SMOKE_DIR/two-ranks.log" | head -n 2 | sed 's/^/  | /'
expect "the line names both counts and the fixes" "$SMOKE_DIR/two-ranks.log" \
  "2 ranks on this node but 1 visible GPU, and each rank needs a GPU of its own: start 1 per node (torchrun --nproc-per-node 1, with a parallel.cp_degree that fits), or run the ranks on CPU (device=cpu)"
if grep -q "out of range" "$SMOKE_DIR/two-ranks.log"; then fail "a rank reached the GPU"; else ok "no rank reached the GPU"; fi
if [ -e "$SMOKE_DIR/two-ranks" ]; then fail "a run directory was created"; else ok "nothing was written"; fi

if [ "${PAPER:-1}" != 0 ]; then
  echo "== the paper config on one GPU: 3 Lighthouse + 2 dense steps at 98,304 tokens"
  data=runs/data/stdlib
  val=$("$PYTHON" -c "import json; print(json.load(open('$data/lh_data.json'))['splits']['val']['tokens'])")
  if [ "$val" -lt 98305 ]; then  # a corpus built before lh-data sized validation for 98K samples
    data=$SMOKE_DIR/data
    "$PYTHON" -m lh_dist.data.cli stdlib --out "$data" --val-tokens 200000 >/dev/null
  fi
  start=$(date +%s)
  "$PYTHON" -m lh_dist.train.cli --config configs/paper-530m-98k.yaml data.path="$data" \
    logging.run_dir="$SMOKE_DIR/paper" schedule.steps=5 schedule.warmup_steps=2 schedule.lighthouse_steps=3 \
    logging.log_interval=1 logging.eval_interval=1000 logging.eval_batches=1 checkpoint.interval=1000 \
    >"$SMOKE_DIR/paper.log" 2>&1
  rc=$?
  echo "  $(($(date +%s) - start)) s, exit $rc (log: $SMOKE_DIR/paper.log)"
  rm -rf "$SMOKE_DIR/paper/checkpoints"  # gigabytes of optimizer state
  if [ "$rc" = 0 ]; then
    ok "5 steps of the paper config on one GPU"
    read -r lh2 lh3 dense5 <<<"$(scalars "$SMOKE_DIR/paper" perf/tokens_per_s 2 3 5)"
    peak=$(scalars "$SMOKE_DIR/paper" perf/peak_memory_gib 5)
    echo "  tokens/s: Lighthouse steps 2, 3: $lh2 $lh3; dense step 5: $dense5; peak memory $peak GiB"
    lh=$(printf '%s\n' "$lh2" "$lh3" | sort -g | tail -n 1)
    if near "$lh" 86800; then ok "Lighthouse phase near README's 86.8k tokens/s ($lh)"; else
      fail "Lighthouse phase $lh tokens/s, README says 86.8k"; fi
    if near "$dense5" 23200; then ok "dense phase near README's 23.2k tokens/s ($dense5)"; else
      fail "dense phase $dense5 tokens/s, README says 23.2k"; fi
    if near "$peak" 19.2; then ok "peak memory near README's 19.2 GiB with selective checkpointing ($peak)"; else
      fail "peak memory $peak GiB, README says 19.2"; fi
  else
    fail "the paper config exits $rc"
  fi
fi

echo
if [ "$failures" = 0 ]; then echo "gpu_smoke: all checks passed"; else echo "gpu_smoke: $failures check(s) failed"; fi
exit "$failures"
