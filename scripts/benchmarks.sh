#!/usr/bin/env bash
# Regenerate every section of docs/BENCHMARKS.md on this machine (about 30 minutes on 2 cores).
# Needs the test setup (bash scripts/setup.sh), espeak-ng, and faster-whisper for the Whisper section.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m pip install -q faster-whisper
"$PY" scripts/bench_preprocessing.py --markdown docs/BENCHMARKS.md
"$PY" scripts/bench_precision.py --markdown docs/BENCHMARKS.md
"$PY" scripts/bench_clip.py --markdown docs/BENCHMARKS.md
"$PY" scripts/bench_gateway.py --markdown docs/BENCHMARKS.md
"$PY" scripts/bench_whisper.py --clips 16 --markdown docs/BENCHMARKS.md
"$PY" scripts/whisper_varied_wer.py --markdown docs/BENCHMARKS.md
