#!/usr/bin/env bash
# Set up .venv and run the whole test suite against a real tritonserver.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest -q --durations=30 "$@"
