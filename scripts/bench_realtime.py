#!/usr/bin/env python
"""Live transcription latency over the Realtime API, at 1 and 8 concurrent sessions.

Whisper tiny.en (real weights) is built and served with the gateway; each session streams a
recording in real time (100 ms of 24 kHz PCM16 every 100 ms: silence, two spoken sentences with
2 s of silence after each) with server VAD (silence_duration_ms 500). Per utterance:
- from the end of its speech (the VAD's audio_end_ms, reached on the session's clock) to its
  `completed` event: what a live caption waits, the VAD's silence window included;
- from `speech_stopped` to `completed`: the transcription itself (commit, the ensemble, the events).

    python scripts/bench_realtime.py [--sessions 1,8] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.build import build
from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper
from tritonkit.gateway.app import spawn_gateway
from tritonkit.gateway.realtime import REALTIME_RATE
from tritonkit.preprocessing.audio import AudioRecipe, decode_audio
from tritonkit.reporting import machine, markdown_table, replace_section
from tritonkit.samples import SENTENCES, speak
from tritonkit.server import TritonServer, free_port

CHUNK_MS = 100
SESSION = {
    "type": "transcription",
    "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}},
}


def recording(folder: Path, first: int) -> bytes:
    import soxr

    silence = np.zeros(2 * REALTIME_RATE, dtype="<i2")
    parts = [silence[: REALTIME_RATE // 2]]
    for k in (first, first + 1):
        spoken = decode_audio(speak(SENTENCES[k % len(SENTENCES)], folder / f"{k}.wav").read_bytes(), AudioRecipe())
        samples = soxr.resample(spoken, 16000, REALTIME_RATE)
        parts += [np.clip(samples * 32768, -32768, 32767).astype("<i2"), silence]
    return np.concatenate(parts).tobytes()


def session(url: str, pcm: bytes) -> list[tuple[float, float]]:
    """Stream `pcm` in real time; per utterance (end of speech -> completed, stopped -> completed)."""
    from websockets.sync.client import connect

    step = 2 * REALTIME_RATE * CHUNK_MS // 1000
    latencies: list[tuple[float, float]] = []
    with connect(url, max_size=None) as socket:
        json.loads(socket.recv(timeout=30))
        socket.send(json.dumps({"type": "session.update", "session": SESSION}))
        began = time.perf_counter()
        stopped: dict[str, tuple[float, float]] = {}  # item -> (audio end on the session's clock, stopped at)
        done = threading.Event()

        def read() -> None:
            utterances = 0
            while utterances < 2:
                event = json.loads(socket.recv(timeout=120))
                now = time.perf_counter() - began
                if event["type"] == "input_audio_buffer.speech_stopped":
                    stopped[event["item_id"]] = (event["audio_end_ms"] / 1000, now)
                elif event["type"] == "conversation.item.input_audio_transcription.completed":
                    end, at = stopped[event["item_id"]]
                    latencies.append((now - end, now - at))
                    utterances += 1
                elif event["type"] == "error":
                    raise RuntimeError(event["error"]["message"])
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for k, start in enumerate(range(0, len(pcm), step)):
            wait = began + k * CHUNK_MS / 1000 - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            socket.send(
                json.dumps(
                    {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[start : start + step]).decode()}
                )
            )
        done.wait(timeout=120)
        reader.join(timeout=1)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,8")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    counts = [int(v) for v in args.sessions.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        repository = folder / "model_repository"
        build(
            "whisper",
            str(convert_ct2_whisper(bundled_tiny_en(), folder / "tiny.en")),
            repository,
            progress=lambda m: print(m, file=sys.stderr),
        )
        recordings = [recording(folder, 2 * k) for k in range(max(counts))]
        port = free_port()
        with TritonServer(repository, grpc_port=port, http_port=free_port(), metrics_port=free_port()):
            gateway, base = spawn_gateway(f"127.0.0.1:{port}")
            try:
                url = base.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
                session(url, recordings[0])  # warm-up
                for count in counts:
                    with ThreadPoolExecutor(count) as pool:
                        results = list(pool.map(lambda pcm: session(url, pcm), recordings[:count]))
                    after_speech = [a for r in results for a, _ in r]
                    after_stop = [b for r in results for _, b in r]
                    rows.append(
                        [
                            count,
                            len(after_speech),
                            f"{np.median(after_speech):.2f} / {np.percentile(after_speech, 95):.2f}",
                            f"{np.median(after_stop):.2f} / {np.percentile(after_stop, 95):.2f}",
                        ]
                    )
            finally:
                gateway.terminate()
                gateway.wait(timeout=30)
    lines = [
        "Whisper tiny.en served with the gateway; each session streams 24 kHz PCM16 in real time (100 ms every 100 ms) "
        f"with server VAD (silence_duration_ms 500), two sentences each. Machine: {machine()['processor']}, {machine()['cpus']} cores. Command: "
        "`python scripts/bench_realtime.py --markdown docs/BENCHMARKS.md`.",
        "",
        *markdown_table(
            [
                "sessions",
                "utterances",
                "end of speech -> completed, s (p50 / p95)",
                "speech_stopped -> completed, s (p50 / p95)",
            ],
            rows,
        ),
        "",
        "The first column includes the VAD's 500 ms silence window (and up to 96 ms until it next runs); the second is the "
        "transcription itself: the commit, one request to the Whisper ensemble, the events.",
    ]
    print("\n".join(lines))
    if args.markdown:
        replace_section(args.markdown, "realtime", "Live transcription over the Realtime API", lines)


if __name__ == "__main__":
    main()
