#!/usr/bin/env bash
# Create .venv with tritonkit (CPU flavor). Idempotent; safe to rerun.
#   bash scripts/setup.sh        # and the test tools (what scripts/test.sh and CI use)
#   bash scripts/setup.sh demo   # only what scripts/demo.sh needs
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-test}
# espeak-ng speaks the test and demo sentences for Whisper. For the tests only: prometheus brings
# promtool and a real Prometheus for the generated alerts and dashboard (tritonkit k8s; on a
# systemd host the package also starts a Prometheus daemon), redis-server a real Redis for the
# gateway's embedding cache, haproxy the balancer in front of replicas (tritonkit.replicas). libjemalloc2: the allocator `tritonkit serve` preloads into tritonserver
# (glibc's malloc lets a long-running server's memory creep up; docs/RELIABILITY.md).
missing=()
command -v espeak-ng > /dev/null || missing+=(espeak-ng)
[ -e "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2" ] || missing+=(libjemalloc2)
if [ "$MODE" = test ]; then
  command -v promtool > /dev/null || missing+=(prometheus)
  command -v redis-server > /dev/null || missing+=(redis-server)
  command -v haproxy > /dev/null || missing+=(haproxy)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    (apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null 2>&1 ||
      { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null; })
  else
    echo "setup: missing ${missing[*]} (apt-get install ${missing[*]}); the tests that need them will fail or skip" >&2
  fi
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch==2.13.0 (the CPU build) comes with the [cpu] extra.
if [ "$MODE" = test ]; then
  python -m pip install --quiet -e ".[cpu,test]"
else
  python -m pip install --quiet -e ".[cpu]"
fi
# Only for the real OpenAI CLIP BPE merges file of the tiny test/demo model; its dependencies
# (torchvision among them) are not needed and would replace the CPU torch build.
python -m pip install --quiet --no-deps open_clip_torch
# resemblyzer's trained speaker encoder (Apache-2.0): `tritonkit build speaker --model resemblyzer`
# reads its weights; the tests compare with the package itself. Its own requirement `webrtcvad`
# needs a C compiler; tritonkit depends on webrtcvad-wheels, which provides the same module.
python -m pip install --quiet --no-deps "resemblyzer==0.1.4"
