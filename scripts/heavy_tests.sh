#!/usr/bin/env bash
# The tests too long for the README's test command (the Whisper and LLaVA soaks with their plan
# gates, a few minutes each): run them before a release or after touching a decoder's memory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest -q -m heavy --durations=10 "$@"
