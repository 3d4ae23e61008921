#!/usr/bin/env python
"""FP32 vs INT8 (static, dynamic) vs FP16 on this CPU, with each variant's accuracy beside its speed.

- CLIP with the ViT-B/32 architecture (random weights: speed does not depend on them; accuracy is
  the cosine to FP32 PyTorch on held-out synthetic photos and captions): image-encoder images/s
  at batch 16 and text-encoder texts/s at batch 64, ONNX Runtime in this process.
- Whisper tiny.en (real weights): audio-seconds/s of encoder + greedy decoder over the spoken
  sample sentences, ONNX Runtime in this process; WER against the spoken text and token agreement
  with FP32.

Every variant is produced and judged by the code `tritonkit build --precision` runs.

    python scripts/bench_precision.py [--json out.json] [--markdown docs/BENCHMARKS.md] [--skip-clip] [--skip-whisper]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.export import export_onnx
from tritonkit.families import get_family
from tritonkit.families.clip import make_vit_b32_clip
from tritonkit.precision import convert, evaluate
from tritonkit.reporting import machine, markdown_table, replace_section

VARIANTS = ["fp32", "int8-static", "int8-dynamic", "fp16"]


def throughput(onnx_file: Path, feed: dict, repeats: int = 5) -> float:
    """Rows per second of one batch, best of `repeats` after a warm-up."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    session.run(None, feed)
    best = min(_timed(lambda: session.run(None, feed)) for _ in range(repeats))
    return len(next(iter(feed.values()))) / best


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def variants(spec, loaded, folder: Path, progress=print):
    """Export every graph once, then build and judge each variant; returns files and reports."""
    exports = {e.role: e for e in spec.exports(loaded)}
    fp32 = {role: export_onnx(e, folder / role / "model.onnx") for role, e in exports.items()}
    data = spec.precision_data(loaded, exports, fp32, None)
    task_check = spec.task_check(loaded, data, fp32)
    files, reports = {"fp32": fp32}, {}
    for variant in VARIANTS:
        if variant != "fp32":
            files[variant] = {
                role: convert(path, path.with_name(f"model.{variant}.onnx"), variant, data.calibration.get(role, []))
                for role, path in fp32.items()
            }
        precision = "int8" if variant.startswith("int8") else variant
        thresholds = dict(spec.precision_thresholds.get(precision, {"min_cosine": 0.0}))
        reports[variant] = evaluate(variant, exports, files[variant], data, thresholds, task_check)
        progress(reports[variant].summary())
    return files, reports, data


def bench_clip(folder: Path) -> list[dict]:
    spec = get_family("clip")
    loaded = spec.load(str(make_vit_b32_clip(folder / "model")))
    files, reports, data = variants(spec, loaded, folder / "onnx")
    rng = np.random.default_rng(0)
    pixels = {"PIXEL_VALUES": rng.normal(0, 1, (16, 3, 224, 224)).astype(np.float32)}
    texts = {k: np.repeat(v, 16, axis=0) for k, v in data.heldout["text_encoder"][0].items()}
    rows = []
    for variant in VARIANTS:
        report = reports[variant]
        rows.append(
            {
                "variant": variant,
                "images_per_s": throughput(files[variant]["image_encoder"], pixels),
                "texts_per_s": throughput(files[variant]["text_encoder"], texts),
                "image_min_cosine": report.graphs["image_encoder"]["min_cosine"],
                "text_min_cosine": report.graphs["text_encoder"]["min_cosine"],
                "passed": report.passed,
            }
        )
        print(rows[-1], flush=True)
    return rows


def bench_whisper(folder: Path) -> list[dict]:
    from tritonkit.accuracy import wer
    from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper
    from tritonkit.preprocessing.audio import SAMPLE_RATE, AudioRecipe, decode_audio
    from tritonkit.samples import SENTENCES, speak

    spec: Any = get_family("whisper")  # the Whisper spec's own transcription helper
    loaded = spec.load(str(convert_ct2_whisper(bundled_tiny_en(), folder / "tiny.en")))
    files, reports, data = variants(spec, loaded, folder / "onnx")
    # Speed and WER over every spoken sentence; the accuracy reports judge the held-out half only.
    task = {
        **data.task,
        "samples": [
            decode_audio(speak(sentence, folder / f"{i}.wav").read_bytes(), AudioRecipe())
            for i, sentence in enumerate(SENTENCES)
        ],
    }
    samples, texts = task["samples"], list(SENTENCES)
    seconds = sum(len(s) for s in samples) / SAMPLE_RATE
    rows = []
    reference_tokens = None
    for variant in VARIANTS:
        start = time.perf_counter()
        tokens, hypotheses = spec._transcribe(loaded, files[variant], task)
        elapsed = time.perf_counter() - start
        reference_tokens = reference_tokens or tokens
        report = reports[variant]
        rows.append(
            {
                "variant": variant,
                "audio_s_per_s": seconds / elapsed,
                "wer": wer(texts, hypotheses),
                "token_agreement": sum(a == b for a, b in zip(tokens, reference_tokens)) / len(tokens),
                "encoder_min_cosine": report.graphs["encoder"]["min_cosine"],
                "passed": report.passed,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--skip-clip", action="store_true")
    parser.add_argument("--skip-whisper", action="store_true")
    args = parser.parse_args()
    result: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as folder:
        if not args.skip_clip:
            result["clip"] = bench_clip(Path(folder) / "clip")
        if not args.skip_whisper:
            result["whisper"] = bench_whisper(Path(folder) / "whisper")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result)


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        f"{result['machine']['cpus']} CPUs, ONNX Runtime CPU provider in one process, best of 5 batches. "
        "Command: `python scripts/bench_precision.py --markdown docs/BENCHMARKS.md`.",
        "",
    ]
    if "clip" in result:
        fp32 = result["clip"][0]
        lines += [
            "CLIP ViT-B/32 architecture (random weights), image batch 16, text batch 16; cosine to FP32 "
            "PyTorch on held-out inputs:",
            "",
        ]
        lines += markdown_table(
            ["variant", "images / s", "vs fp32", "texts / s", "image min cosine", "text min cosine", "report"],
            [
                [
                    r["variant"],
                    f"{r['images_per_s']:.1f}",
                    f"{r['images_per_s'] / fp32['images_per_s']:.2f}x",
                    f"{r['texts_per_s']:.1f}",
                    f"{r['image_min_cosine']:.4f}",
                    f"{r['text_min_cosine']:.4f}",
                    "pass" if r["passed"] else "fail",
                ]
                for r in result["clip"]
            ],
            align_right_from=1,
        )
        lines.append("")
    if "whisper" in result:
        fp32 = result["whisper"][0]
        lines += ["Whisper tiny.en (real weights), encoder + greedy decoder over the 11 spoken sentences:", ""]
        lines += markdown_table(
            ["variant", "audio-s / s", "vs fp32", "WER", "same tokens as fp32", "encoder min cosine", "report"],
            [
                [
                    r["variant"],
                    f"{r['audio_s_per_s']:.1f}",
                    f"{r['audio_s_per_s'] / fp32['audio_s_per_s']:.2f}x",
                    f"{r['wer']:.3f}",
                    f"{r['token_agreement']:.2f}",
                    f"{r['encoder_min_cosine']:.4f}",
                    "pass" if r["passed"] else "fail",
                ]
                for r in result["whisper"]
            ],
            align_right_from=1,
        )
    replace_section(path, "bench_precision", "Precision (FP32, INT8, FP16) on CPU", lines)


if __name__ == "__main__":
    main()
