#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install lh_dist with its test extras.
# Idempotent: a second run only checks that everything imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.lh_dist-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ launch/constraints.txt -nt "$stamp" ]; then
  echo "installing lh_dist into $VENV (first time: a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  # DS_BUILD_OPS=0: DeepSpeed builds no CUDA extensions at install time (none are needed here).
  # A download cut off mid-way resumes (--resume-retries); a failed install is tried twice more,
  # reusing pip's cache, since a registry connection can drop during the large wheels.
  for attempt in 1 2 3; do
    if DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --resume-retries 10 -c launch/constraints.txt -e ".[dev]"; then
      break
    fi
    [ "$attempt" = 3 ] && { echo "setup: pip install failed 3 times" >&2; exit 1; }
    echo "setup: pip install failed (attempt $attempt of 3); retrying in 10 s" >&2
    sleep 10
  done
  touch "$stamp"
fi
"$VENV/bin/python" -c "import lh_dist, torch, deepspeed, streaming; print('lh_dist ready: torch', torch.__version__)" 2>&1 | grep -v -i "warn"
