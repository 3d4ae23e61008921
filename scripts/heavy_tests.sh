#!/usr/bin/env bash
# The tests too long for the README's test command: the Whisper and LLaVA soaks with their plan
# gates, replicas with chat behind haproxy, and the precision variants the CI keeps one of (Whisper's
# dynamic INT8, Qwen-VL's ONNX Runtime INT8 tower). Run them before a release, or after touching a
# decoder's memory, termination or quantization.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest -q -m heavy --durations=10 "$@"
