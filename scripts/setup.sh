#!/usr/bin/env bash
# Create .venv with tritonkit (CPU flavor) and its test tools. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch==2.13.0 (the CPU build) comes with the [cpu] extra.
python -m pip install --quiet -e ".[cpu,test]"
# Only for the real OpenAI CLIP BPE merges file of the tiny test/demo model; its dependencies
# (torchvision among them) are not needed and would replace the CPU torch build.
python -m pip install --quiet --no-deps open_clip_torch
