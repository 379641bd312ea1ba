#!/usr/bin/env bash
# Set up (idempotent) and run the tests:
#   bash launch/test.sh [pytest args]          both tiers, tests/unit first
#   bash launch/test.sh quick [pytest args]    tests/unit only: one process, nothing started, a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${VENV:-.venv}
if [ "${1:-}" = quick ]; then
  shift
  exec "$VENV/bin/python" -m pytest -q tests/unit "$@"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
