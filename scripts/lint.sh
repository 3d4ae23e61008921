#!/usr/bin/env bash
# Lint, format and type checks (what .ci/run runs before the tests; pre-commit runs the same).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
ruff check .
ruff format --check .
mypy
