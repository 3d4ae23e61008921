#!/usr/bin/env bash
# The tests too long for the README's test command: the Whisper and LLaVA soaks with their plan
# gates, replicas with chat behind haproxy, Whisper tiny.en's INT8 WER gates (ONNX Runtime static
# and dynamic, OpenVINO), Qwen-VL's ONNX Runtime INT8 tower, `tritonkit tune`'s search and the
# speaker encoder's FP16 and OpenVINO INT8 variants. Run them before a release, or after touching a
# decoder's memory, termination or quantization.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest -q -m heavy --durations=10 "$@"
