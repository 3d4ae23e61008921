#!/usr/bin/env python
"""Preprocessing throughput and parity, side by side in one run on the same inputs.

Images (CLIP ViT-B/32 settings: shortest edge 224, center crop 224, bicubic), encoded JPEG photos
in, normalized pixels out:
  - transformers `CLIPImageProcessor` (PIL backend here), batch 16 per call
  - tritonkit's PIL engine (`--preprocessing python`), one image at a time
  - tritonkit's DALI pipeline with CPU operators, batch 16, 1 and 2 threads
Audio (Whisper, 80 mel bins), 16 kHz windows in, log-mel features out:
  - transformers `WhisperFeatureExtractor` (numpy), batch 8
  - tritonkit's numpy log-mel, batch 8
  - tritonkit's DALI log-mel pipeline with CPU operators, batch 8, 1 and 2 threads
Parity: max and mean absolute differences of each against transformers on the same inputs, and
the gap that DALI's own audio resampler would add (why the audio decode stays on soxr).

    python scripts/bench_preprocessing.py [--images 64] [--windows 16] [--json out.json] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.preprocessing.audio import SAMPLE_RATE, WINDOW_SAMPLES, log_mel
from tritonkit.preprocessing.dali import DaliRunner, image_graph, log_mel_graph, serialize
from tritonkit.preprocessing.image import ImageRecipe, image_bytes_to_pixels
from tritonkit.reporting import machine, markdown_table, replace_section

BATCH_IMAGES, BATCH_WINDOWS = 16, 8


def photos(count: int) -> list[bytes]:
    """Smooth random 'photos' of common camera/web sizes, JPEG quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(480, 640), (720, 1280), (1080, 1440), (600, 800), (1024, 768)]
    files = []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def windows(count: int) -> list[np.ndarray]:
    """Speech-like 16 kHz audio: modulated harmonics with noise, 30 s windows (the encoder's unit)."""
    rng = np.random.default_rng(1)
    t = np.arange(WINDOW_SAMPLES) / SAMPLE_RATE
    out = []
    for i in range(count):
        pitch = 110 + 20 * i
        voice = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 6)) * (
            0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
        )
        out.append((0.1 * voice + rng.normal(0, 0.01, len(t))).astype(np.float32))
    return out


def rate(function, items: float, repeats: int = 3) -> float:
    """Items per second, best of `repeats` runs after a warm-up."""
    function()
    best = min(_timed(function) for _ in range(repeats))
    return items / best


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def dali_runner(graph, batch: int, threads: int) -> DaliRunner:
    return DaliRunner(serialize(graph, "cpu", batch, threads), batch, threads)


def run_dali(runner: DaliRunner, name: str, rows: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for chunk in batched(rows, runner.max_batch_size):
        out += [r[0] for r in runner.run_all({name: chunk})]
    return out


def differences(ours: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, float]:
    diff = np.abs(np.stack(ours) - np.stack(reference))
    return float(diff.max()), float(diff.mean())


def bench_images(count: int) -> list[dict]:
    from PIL import Image
    from transformers import CLIPImageProcessor

    files = photos(count)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    recipe = ImageRecipe.from_processor(processor).with_options(exif_orientation=False)
    rows = [np.frombuffer(f, dtype=np.uint8) for f in files]

    def transformers_run():
        out = []
        for chunk in batched(files, BATCH_IMAGES):
            images: list = [Image.open(io.BytesIO(f)) for f in chunk]
            out += list(processor(images, return_tensors="np")["pixel_values"])
        return out

    reference = transformers_run()
    results = [
        {
            "system": "transformers CLIPImageProcessor",
            "setting": f"batch {BATCH_IMAGES}",
            "per_s": rate(transformers_run, count),
            "max_abs": 0.0,
            "mean_abs": 0.0,
        }
    ]
    pil = [image_bytes_to_pixels(f, recipe) for f in files]
    results.append(
        {
            "system": "tritonkit PIL engine",
            "setting": "one at a time",
            "per_s": rate(lambda: [image_bytes_to_pixels(f, recipe) for f in files], count),
            **dict(zip(("max_abs", "mean_abs"), differences(pil, reference))),
        }
    )
    for threads in (1, 2):
        runner = dali_runner(image_graph(recipe, "IMAGE"), BATCH_IMAGES, threads)
        ours = run_dali(runner, "IMAGE", rows)
        results.append(
            {
                "system": "tritonkit DALI (CPU operators)",
                "setting": f"batch {BATCH_IMAGES}, {threads} threads",
                "per_s": rate(lambda runner=runner: run_dali(runner, "IMAGE", rows), count),
                **dict(zip(("max_abs", "mean_abs"), differences(ours, reference))),
            }
        )
    return results


def bench_audio(count: int) -> list[dict]:
    from transformers import WhisperFeatureExtractor

    samples = windows(count)
    extractor = WhisperFeatureExtractor(feature_size=80)
    seconds = count * WINDOW_SAMPLES / SAMPLE_RATE

    def transformers_run():
        out = []
        for chunk in batched(samples, BATCH_WINDOWS):
            out += list(extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"])
        return out

    reference = transformers_run()
    results = [
        {
            "system": "transformers WhisperFeatureExtractor",
            "setting": f"batch {BATCH_WINDOWS}",
            "per_s": rate(transformers_run, seconds),
            "max_abs": 0.0,
            "mean_abs": 0.0,
        }
    ]

    def numpy_run():
        out = []
        for chunk in batched(samples, BATCH_WINDOWS):
            out += list(log_mel(chunk, extractor.mel_filters))
        return out

    results.append(
        {
            "system": "tritonkit numpy log-mel",
            "setting": f"batch {BATCH_WINDOWS}",
            "per_s": rate(numpy_run, seconds),
            **dict(zip(("max_abs", "mean_abs"), differences(numpy_run(), reference))),
        }
    )
    for threads in (1, 2):
        runner = dali_runner(log_mel_graph(80, "WINDOW_SAMPLES"), BATCH_WINDOWS, threads)
        ours = run_dali(runner, "WINDOW_SAMPLES", samples)
        results.append(
            {
                "system": "tritonkit DALI log-mel (CPU operators)",
                "setting": f"batch {BATCH_WINDOWS}, {threads} threads",
                "per_s": rate(lambda runner=runner: run_dali(runner, "WINDOW_SAMPLES", samples), seconds),
                **dict(zip(("max_abs", "mean_abs"), differences(ours, reference))),
            }
        )
    return results


def resampler_gap() -> list[dict]:
    """Log-mel differences between DALI's audio decoder resampling and soxr (what tritonkit uses)."""
    import soundfile
    import soxr
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80)
    pipe = Pipeline(
        batch_size=1, num_threads=1, device_id=None, exec_async=False, exec_pipelined=False, prefetch_queue_depth=1
    )
    with pipe:
        data = fn.external_source(name="AUDIO", dtype=types.DALIDataType.UINT8, ndim=1)
        audio, _ = fn.decoders.audio(data, sample_rate=SAMPLE_RATE, downmix=True, dtype=types.DALIDataType.FLOAT)
        pipe.set_outputs(audio)
    pipe.build()
    speech = windows(1)[0][: SAMPLE_RATE * 8]
    rows = []
    for rate_hz, channels in ((8000, 1), (22050, 1), (44100, 2)):
        resampled = soxr.resample(speech, SAMPLE_RATE, rate_hz).astype(np.float32)
        buffer = io.BytesIO()
        soundfile.write(buffer, np.stack([resampled] * channels, axis=1), rate_hz, format="WAV")
        pipe.feed_input("AUDIO", [np.frombuffer(buffer.getvalue(), dtype=np.uint8)])
        (out,) = pipe.run()
        dali = np.array(out[0])
        ours = soxr.resample(resampled, rate_hz, SAMPLE_RATE, quality="HQ").astype(np.float32)
        features = [
            extractor(x, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0] for x in (dali, ours)
        ]
        diff = np.abs(features[0] - features[1])
        rows.append(
            {"input": f"{rate_hz} Hz, {channels} ch", "max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    result = {
        "machine": machine(),
        "images": bench_images(args.images),
        "audio": bench_audio(args.windows),
        "resampler_gap": resampler_gap(),
        "counts": {"images": args.images, "windows": args.windows},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result)


def write_markdown(path: Path, result: dict) -> None:
    counts = result["counts"]
    lines = [
        f"{counts['images']} JPEG photos (480x640 to 1080x1440) and {counts['windows']} windows of 30 s, "
        f"{result['machine']['cpus']} CPUs, best of 3 runs. Command: "
        "`python scripts/bench_preprocessing.py --markdown docs/BENCHMARKS.md`. Differences are against "
        "transformers on the same inputs (images: normalized pixel units; audio: log-mel units).",
        "",
    ]
    lines += markdown_table(
        ["images", "setting", "images / s", "max abs diff", "mean abs diff"],
        [
            [r["system"], r["setting"], f"{r['per_s']:.1f}", f"{r['max_abs']:.3g}", f"{r['mean_abs']:.3g}"]
            for r in result["images"]
        ],
    )
    lines.append("")
    lines += markdown_table(
        ["audio", "setting", "audio-s / s", "max abs diff", "mean abs diff"],
        [
            [r["system"], r["setting"], f"{r['per_s']:.0f}", f"{r['max_abs']:.3g}", f"{r['mean_abs']:.3g}"]
            for r in result["audio"]
        ],
    )
    lines += [
        "",
        "Resampling to 16 kHz with DALI's audio decoder instead of soxr (tritonkit's choice), "
        "log-mel difference on the same speech-like signal:",
        "",
    ]
    lines += markdown_table(
        ["input", "max abs diff", "mean abs diff"],
        [[r["input"], f"{r['max_abs']:.3g}", f"{r['mean_abs']:.3g}"] for r in result["resampler_gap"]],
        align_right_from=1,
    )
    replace_section(path, "bench_preprocessing", "Preprocessing (DALI CPU vs transformers)", lines)


if __name__ == "__main__":
    main()
