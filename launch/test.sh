#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q "$@"
