#!/usr/bin/env python
"""In-flight vs static batching of the Whisper decoder, side by side in one run.

Whisper tiny.en (real weights, the bundled CTranslate2 model) is built once and served twice on a
real tritonserver: with `decoder_batching` static (a dynamic batch of windows decoded to its
longest, long-form files window by window together: the scheduler before in-flight batching) and
in-flight (the default). Each serving answers:

- the head-of-line cases: a 4.5 s clip sent 0.3 s after two 70 s files with TIMESTAMPS
  (long-form), its latency over its latency alone; and two 70 s files sent together, the second's
  latency over the first's;
- the same open-loop Poisson arrivals at several rates: spoken clips of 5-9 s, and one request in
  five a 70 s file with TIMESTAMPS. Reported per rate: completed requests per second, audio seconds
  per second, latency p50/p95 of the clips and of the long files.

    python scripts/bench_inflight_whisper.py [--rates 0.5,1,2] [--duration 30] [--markdown docs/BENCHMARKS.md]

Needs espeak-ng (the clips are spoken sentences).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tritonkit.build import build
from tritonkit.client import TritonkitClient, pack_byte_rows
from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper
from tritonkit.preprocessing.audio import SAMPLE_RATE, AudioRecipe, decode_audio
from tritonkit.reporting import machine, markdown_table, replace_section
from tritonkit.samples import SENTENCES, speak
from tritonkit.server import TritonServer, free_port

LONG_SHARE = 0.2  # of the trace's requests: 70 s files with TIMESTAMPS


def wav(samples: np.ndarray) -> bytes:
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, format="WAV")
    return buffer.getvalue()


def make_audio(folder: Path) -> tuple[list[bytes], bytes, bytes]:
    """Clips of 5-9 s (two or three sentences), a 4.5 s clip and a 70 s file of sentences."""
    spoken = [decode_audio(speak(s, folder / f"{i}.wav").read_bytes(), AudioRecipe()) for i, s in enumerate(SENTENCES)]
    gap = np.zeros(int(0.5 * SAMPLE_RATE), dtype=np.float32)
    clips = []
    for i in range(8):
        parts = [spoken[(i + k) % len(spoken)] for k in range(2 + i % 2)]
        clips.append(wav(np.concatenate([p for part in parts for p in (part, gap)])))
    short = np.concatenate([spoken[0], gap, spoken[9]])[: int(4.5 * SAMPLE_RATE)]
    pieces: list[np.ndarray] = []
    while sum(len(p) for p in pieces) < 70 * SAMPLE_RATE:
        for part in spoken:
            pieces += [part, gap]
    long_file = np.concatenate(pieces)[: 70 * SAMPLE_RATE]
    return clips, wav(short), wav(long_file)


def transcribe(url: str, data: bytes, timestamps: bool) -> float:
    """One request; its end time."""
    inputs: dict[str, Any] = {"AUDIO": pack_byte_rows([data])}
    if timestamps:
        inputs["TIMESTAMPS"] = np.array([[True]])
    with TritonkitClient(url) as client:
        client.infer("whisper", inputs)
    return time.perf_counter()


def timed(function) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def trace(rate: float, duration_s: float, clips: int, seed: int = 0) -> list[tuple[float, bool, int]]:
    """(arrival s, long file?, clip) of each request."""
    rng = np.random.default_rng(seed)
    out: list[tuple[float, bool, int]] = []
    at = 0.0
    while True:
        at += rng.exponential(1 / rate)
        if at >= duration_s:
            return out
        out.append((at, bool(rng.random() < LONG_SHARE), int(rng.integers(clips))))


def run_trace(url: str, requests, clips: list[bytes], long_file: bytes) -> dict:
    records: list[dict] = [{} for _ in requests]
    began = time.perf_counter()

    def one(k: int) -> None:
        at, is_long, clip = requests[k]
        delay = began + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        start = time.perf_counter()
        data = long_file if is_long else clips[clip]
        try:
            end = transcribe(url, data, timestamps=is_long)
            records[k] = {"long": is_long, "latency": end - start, "end": end, "audio_s": audio_seconds(data)}
        except Exception as exc:
            records[k] = {"long": is_long, "error": str(exc)[:200]}

    with ThreadPoolExecutor(max(8, len(requests))) as pool:
        list(pool.map(one, range(len(requests))))
    done = [r for r in records if "error" not in r]
    span = max(r["end"] for r in done) - began if done else float("nan")

    def pct(values, q):
        return round(float(np.percentile(values, q)), 2) if values else float("nan")

    clip_latency = [r["latency"] for r in done if not r["long"]]
    long_latency = [r["latency"] for r in done if r["long"]]
    return {
        "requests": len(records),
        "completed": len(done),
        "completed_per_s": round(len(done) / span, 2) if done else 0.0,
        "audio_s_per_s": round(sum(r["audio_s"] for r in done) / span, 1) if done else 0.0,
        "clip_p50_s": pct(clip_latency, 50),
        "clip_p95_s": pct(clip_latency, 95),
        "long_p50_s": pct(long_latency, 50),
        "long_p95_s": pct(long_latency, 95),
    }


def audio_seconds(data: bytes) -> float:
    import io

    import soundfile

    info = soundfile.info(io.BytesIO(data))
    return info.frames / info.samplerate


def set_batching(repository: Path, mode: str) -> None:
    path = repository / "whisper_decoder" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.parameters["decoder_batching"].string_value = mode
    path.write_text(text_format.MessageToString(config))


def served(repository: Path, mode: str, rates, duration: float, audio, rows: list[dict], head: dict) -> None:
    clips, short, long_file = audio
    set_batching(repository, mode)
    server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server.start().wait_until_ready(300)
    try:
        url = server.grpc_url
        transcribe(url, clips[0], False)  # warm-up
        transcribe(url, long_file, True)
        alone = min(timed(lambda: transcribe(url, short, False)) for _ in range(3))
        long_alone = timed(lambda: transcribe(url, long_file, True))
        latencies: dict[str, float] = {}

        def long_one(name: str) -> None:
            latencies[name] = timed(lambda: transcribe(url, long_file, True))

        runners = [threading.Thread(target=long_one, args=(name,)) for name in ("first", "second")]
        for runner in runners:
            runner.start()
        time.sleep(0.3)
        behind = timed(lambda: transcribe(url, short, False))
        for runner in runners:
            runner.join()
        first, second = sorted(latencies.values())
        head[mode] = {
            "clip_alone_s": round(alone, 3),
            "clip_behind_s": round(behind, 3),
            "clip_ratio": round(behind / alone, 2),
            "long_alone_s": round(long_alone, 2),
            "long_first_s": round(first, 2),
            "long_second_s": round(second, 2),
        }
        print(mode, head[mode], flush=True)
        for rate in rates:
            row = {
                "system": f"tritonkit {mode}",
                "rate": rate,
                **run_trace(url, trace(rate, duration, len(clips)), clips, long_file),
            }
            rows.append(row)
            print(row, flush=True)
    finally:
        server.stop()


def rows_sweep(repository: Path, audio, rows_options=(4, 8, 16, 32)) -> list[dict]:
    """The decoder's step loop in this process (the instance's threads: all cores) on the same
    48 windows with TIMESTAMPS at each bound on rows in flight: windows decoded per second."""
    import onnxruntime as ort
    from transformers import WhisperFeatureExtractor

    from tritonkit.triton_config import parse_text
    from tritonkit.whisper_decoding import DecodeOptions, DecodeSettings, WindowDecoder
    from tritonkit.whisper_loop import WhisperLoop, wait_windows

    folder = repository / "whisper_decoder"
    parameters = {k: v.string_value for k, v in parse_text((folder / "config.pbtxt").read_text()).parameters.items()}
    version = folder / "1"
    decoder = WindowDecoder(
        ort.InferenceSession(str(version / parameters.get("cross_kv_file", "cross_kv.onnx"))),
        ort.InferenceSession(str(version / parameters.get("step_file", "step.onnx"))),
        DecodeSettings.from_json(parameters["decode_settings"]),
    )
    encoder = ort.InferenceSession(str(repository / "whisper_encoder" / "1" / "model.onnx"))
    clips = [decode_audio(data, AudioRecipe()) for data in audio[0]]
    extractor = WhisperFeatureExtractor()
    features = extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"].astype(np.float32)
    hidden = encoder.run(None, {encoder.get_inputs()[0].name: features})[0]
    windows = [{"hidden": hidden[k % len(hidden)], "options": DecodeOptions(timestamps=True)} for k in range(48)]
    sweep = []
    for rows in rows_options:
        loop = WhisperLoop(decoder, max_rows=rows)
        try:
            wait_windows(loop, windows[:4])  # warm-up
            began = time.perf_counter()
            wait_windows(loop, windows)
            seconds = time.perf_counter() - began
        finally:
            loop.stop()
        sweep.append({"max_rows_in_flight": rows, "windows_per_s": round(len(windows) / seconds, 2)})
        print(sweep[-1], flush=True)
    return sweep


def write_markdown(path: Path, result: dict) -> None:
    header = [
        "system",
        "arrivals/s",
        "completed",
        "req/s",
        "audio s/s",
        "clip p50 s",
        "clip p95 s",
        "70 s file p50 s",
        "70 s file p95 s",
    ]
    table = [
        [
            r["system"],
            r["rate"],
            f"{r['completed']}/{r['requests']}",
            r["completed_per_s"],
            r["audio_s_per_s"],
            r["clip_p50_s"],
            r["clip_p95_s"],
            r["long_p50_s"],
            r["long_p95_s"],
        ]
        for r in result["rows"]
    ]
    head = result["head_of_line"]
    lines = [
        f"Whisper tiny.en, the decoder with one instance on {result['machine']['cpus']} cores; Poisson arrivals for {result['duration_s']:g} s at "
        f"each rate, spoken clips of 5-9 s and one request in five a 70 s file with TIMESTAMPS (long-form); one run, "
        f"both schedulers on the same trace (`python scripts/bench_inflight_whisper.py`). Machine: {result['machine']['processor']}.",
        "",
        *markdown_table(header, table),
        "",
    ]
    for mode in ("static", "inflight"):
        h = head[mode]
        lines.append(
            f"Head of line, {mode}: a 4.5 s clip sent 0.3 s after two 70 s long-form files took {h['clip_ratio']:.2f}x "
            f"its latency alone ({h['clip_behind_s']:.2f} s vs {h['clip_alone_s']:.2f} s); the two files, started "
            f"together, took {h['long_first_s']:.1f} s and {h['long_second_s']:.1f} s (one alone: {h['long_alone_s']:.1f} s)."
        )
        lines.append("")
    replace_section(path, "inflight-whisper", "In-flight batching: Whisper", lines[:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.5,1,2", help="Arrivals per second, comma-separated")
    parser.add_argument("--duration", type=float, default=30, help="Seconds of arrivals at each rate")
    parser.add_argument("--repository", type=Path, help="A built Whisper repository (default: build tiny.en)")
    parser.add_argument(
        "--rows-sweep",
        action="store_true",
        help="Only the decoder's step loop in process at 4, 8, 16, 32 rows in flight (windows per second)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="Replace the inflight-whisper section of this file")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        repository = args.repository
        if repository is None:
            repository = folder / "repo"
            build("whisper", str(convert_ct2_whisper(bundled_tiny_en(), folder / "tiny.en")), repository)
        audio = make_audio(folder)
        if args.rows_sweep:
            print(json.dumps({"machine": machine(), "sweep": rows_sweep(repository, audio)}, indent=2))
            return
        rows: list[dict] = []
        head: dict = {}
        for mode in ("static", "inflight"):
            served(repository, mode, rates, args.duration, audio, rows, head)
    result = {"machine": machine(), "duration_s": args.duration, "rows": rows, "head_of_line": head}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
