#!/usr/bin/env python
"""Soak test: mixed valid and invalid requests at concurrency 16 against a served CLIP, Whisper or LLaVA repository.

Checks, for the whole run: no valid request fails, every invalid request is answered with an
error of its own (a short message, not a broken stream or a lost connection), no request hangs (client timeouts are counted), and the resident memory of tritonserver
and its Python-backend stubs levels off (the median of the last third of the run within a bound
of the middle third's; the first third fills batch-sized buffers, shown per process in the report). Exits 1 on any
violation; prints a JSON report.

    python scripts/soak.py [--family clip|whisper|llava] [--repository REPO] [--duration 600] [--concurrency 16]
                           [--max-rss-growth-mb 300]

Without --repository it builds one first: the tiny random CLIP or LLaVA, or Whisper tiny.en from the bundled weights.
The invalid inputs include what once crashed or stalled the server: tiny sampling temperatures, prompts
beyond the context, a 1x20000 image, 20 KB option strings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.server import TritonServer, free_port, process_tree_rss


class Case(NamedTuple):
    label: str
    model: str
    inputs: dict[str, np.ndarray]
    valid: bool


def byte_row(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)[None, :] if data else np.zeros((1, 0), dtype=np.uint8)


def string(raw: bytes) -> np.ndarray:
    return np.array([[raw]], dtype=object)


def clip_cases() -> list[Case]:
    """What real clients of the CLIP ensembles send, good and bad."""
    import io

    from PIL import Image

    from tritonkit.families.clip import synthetic_photo

    def image(data: bytes) -> dict[str, np.ndarray]:
        return {"IMAGE": byte_row(data)}

    def text(raw: bytes) -> dict[str, np.ndarray]:
        return {"TEXT": string(raw)}

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(png, format="PNG")
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG")
    jpeg = synthetic_photo(3)
    return [
        Case("jpeg", "clip_image", image(jpeg), True),
        Case("png", "clip_image", image(png.getvalue()), True),
        Case("photo", "clip_image", image(synthetic_photo(4, 720, 1280)), True),
        Case("text", "clip_text", text(b"a photo of a cat"), True),
        Case("long text", "clip_text", text(("word " * 20000).encode()), True),
        Case("empty image", "clip_image", image(b""), False),
        Case("truncated jpeg", "clip_image", image(jpeg[: len(jpeg) // 3]), False),
        Case("random bytes", "clip_image", image(np.random.default_rng(1).bytes(5000)), False),
        Case("pdf", "clip_image", image(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"), False),
        Case("decompression bomb", "clip_image", image(bomb.getvalue()), False),
        Case("non-utf8 text", "clip_text", text(b"\xff\xfe\xfd bad"), False),
        Case("1x20000 image", "clip_image", image(elongated_png()), False),
    ]


def whisper_cases() -> list[Case]:
    """What real clients of the Whisper ensemble send, good and bad (speech needs espeak-ng)."""
    import io
    import zipfile

    import soundfile

    from tritonkit import samples

    def audio(data: bytes, **options: str) -> dict[str, np.ndarray]:
        return {"AUDIO": byte_row(data), **{name.upper(): string(value.encode()) for name, value in options.items()}}

    def encoded(samples_: np.ndarray, rate: int, fmt: str) -> bytes:
        buffer = io.BytesIO()
        soundfile.write(buffer, samples_, rate, format=fmt, subtype="PCM_16")
        return buffer.getvalue()

    with tempfile.TemporaryDirectory() as folder:
        speech = samples.speak(samples.SENTENCES[1], Path(folder) / "speech.wav").read_bytes()
    decoded, rate = soundfile.read(io.BytesIO(speech), dtype="float32")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("speech.wav", speech)
    noise = np.random.default_rng(2).uniform(-0.3, 0.3, 3 * 16000).astype(np.float32)
    return [
        Case("speech wav", "whisper", audio(speech), True),
        Case("speech flac", "whisper", audio(encoded(decoded, rate, "FLAC")), True),
        Case("speech, language named", "whisper", audio(speech, language="english"), True),
        Case("silence", "whisper", audio(encoded(np.zeros(2 * 16000, np.float32), 16000, "WAV")), True),
        Case("noise", "whisper", audio(encoded(noise, 16000, "WAV")), True),
        Case("empty audio", "whisper", audio(b""), False),
        Case("truncated wav", "whisper", audio(speech[:40]), False),
        Case("random bytes", "whisper", audio(np.random.default_rng(1).bytes(5000)), False),
        Case("pdf", "whisper", audio(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"), False),
        Case("zip", "whisper", audio(archive.getvalue()), False),
        Case("612 s audio", "whisper", audio(encoded(np.zeros(612 * 8000, np.float32), 8000, "WAV")), False),
        Case("unknown language", "whisper", audio(speech, language="klingon"), False),
        Case("unknown task", "whisper", audio(speech, task="summarize"), False),
        Case("20 KB language", "whisper", audio(speech, language="q" * 20_000), False),
        Case("20 KB task", "whisper", audio(speech, task="q" * 20_000), False),
    ]


def elongated_png() -> bytes:
    """1x20000 pixels: its resize before the crop once took an image stub to 3.2 GB."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (1, 20000, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def llava_cases() -> list[Case]:
    """What clients of the LLaVA chat ensemble send, good and bad."""
    from tritonkit.client import chat_inputs
    from tritonkit.families.clip import synthetic_photo

    photo = synthetic_photo(5, 120, 160)

    def chat(prompt: str, image: bytes = photo, **options) -> dict[str, np.ndarray]:
        return chat_inputs(image, prompt, **{"max_new_tokens": 8, **options})

    def raw_prompt(raw: bytes) -> dict[str, np.ndarray]:
        return {**chat("x"), "PROMPT": string(raw)}

    return [
        Case("greedy", "llava_chat", chat("What is in the picture?"), True),
        Case("sampled", "llava_chat", chat("Describe it.", temperature=0.7, top_p=0.9, seed=3), True),
        Case("temperature 1e-40", "llava_chat", chat("Describe it.", temperature=1e-40), True),
        Case("stop string", "llava_chat", chat("Describe it.", stop=("the",)), True),
        Case("100 KB prompt", "llava_chat", chat("a" * 100_000), False),
        Case("prompt beyond the context", "llava_chat", chat("word " * 3000), False),
        Case("max tokens beyond the context", "llava_chat", chat("word " * 1850, max_new_tokens=256), False),
        Case("1x20000 image", "llava_chat", chat("What?", image=elongated_png()), False),
        Case("pdf image", "llava_chat", chat("What?", image=b"%PDF-1.4\n"), False),
        Case("20 KB stop string", "llava_chat", chat("What?", stop=("q" * 20_000,)), False),
        Case("temperature 5", "llava_chat", chat("What?", temperature=5.0), False),
        Case("top_p 0", "llava_chat", chat("What?", top_p=0.0), False),
        Case("non-utf8 prompt", "llava_chat", raw_prompt(b"\xff\xfe bad"), False),
    ]


FAMILIES = {"clip": clip_cases, "whisper": whisper_cases, "llava": llava_cases}
# What an invalid request must not get instead of its own error: the server or the stream broke.
TRANSPORT_FAILURES = ("Stream removed", "Socket closed", "failed to connect", "Connection reset", "metadata size")
MAX_ERROR_CHARS = 1100  # tritonkit.errors.MAX_MESSAGE_CHARS plus the ensemble's prefix


async def soak(url: str, cases: list[Case], duration: float, concurrency: int, timeout: float, server_pid: int) -> dict:
    import tritonclient.grpc.aio as grpcclient

    from tritonkit.dtypes import wire_datatype

    client = grpcclient.InferenceServerClient(url)
    counts = {case.label: {"sent": 0, "ok": 0, "error": 0, "timeout": 0} for case in cases}
    unexpected: list[str] = []
    deadline = time.perf_counter() + duration
    rng = random.Random(0)

    async def worker():
        while time.perf_counter() < deadline:
            case = rng.choice(cases)
            tensors = []
            for name, array in case.inputs.items():
                tensors.append(grpcclient.InferInput(name, list(array.shape), wire_datatype(array)))
                tensors[-1].set_data_from_numpy(array)
            counts[case.label]["sent"] += 1
            try:
                await client.infer(case.model, tensors, client_timeout=timeout)
                counts[case.label]["ok"] += 1
                if not case.valid:
                    unexpected.append(f"{case.label}: answered without an error")
            except Exception as exc:
                text = str(exc)
                if "Deadline" in text or "timed out" in text.lower():
                    counts[case.label]["timeout"] += 1
                else:
                    counts[case.label]["error"] += 1
                    if case.valid:
                        unexpected.append(f"{case.label}: {text.strip().splitlines()[0][:200]}")
                    elif any(f in text for f in TRANSPORT_FAILURES) or len(text) > MAX_ERROR_CHARS:
                        unexpected.append(f"{case.label}: no message of its own ({len(text)} chars): {text[:200]}")

    timeline: list[tuple[float, float]] = []  # (seconds into the run, MB resident), to see growth level off

    async def sample_memory():
        began = time.perf_counter()
        while time.perf_counter() < deadline:
            timeline.append(
                (round(time.perf_counter() - began), round(sum(process_tree_rss(server_pid).values()) / 2**20))
            )
            await asyncio.sleep(max(duration / 30, 1.0))

    try:
        await asyncio.gather(sample_memory(), *(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return {
        "counts": counts,
        "unexpected": unexpected[:20],
        "unexpected_total": len(unexpected),
        "rss_mb_timeline": timeline,
    }


def settled_growth_mb(samples: list[float]) -> float:
    """Median memory of the run's last third minus that of its middle third. Medians ignore the
    moments a large request's buffers are alive; the first third fills batch-sized buffers."""
    if len(samples) < 3:
        return 0.0
    third = len(samples) // 3
    return float(np.median(samples[-third:]) - np.median(samples[third : 2 * third]))


def process_label(pid: int) -> str:
    """'tritonserver' or the model a Python-backend stub serves (from its command line)."""
    try:
        words = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    if b"triton_python_backend_stub" not in words[0]:
        return Path(words[0].decode(errors="replace")).name
    model_file = Path(words[1].decode(errors="replace"))  # REPO/MODEL/VERSION/model.py
    return f"{model_file.parent.parent.name} stub"


def tiny_repository(family: str, folder: Path) -> Path:
    """The tiny random CLIP or LLaVA, or the bundled real Whisper tiny.en, built into a repository."""
    from tritonkit.build import build

    repository = folder / "repo"
    if family == "clip":
        from tritonkit.tiny import make_tiny_clip

        build("clip", str(make_tiny_clip(folder / "clip")), repository)
    elif family == "llava":
        from tritonkit.tiny import make_tiny_llava

        build("llava", str(make_tiny_llava(folder / "llava")), repository)
    else:
        from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper

        build("whisper", str(convert_ct2_whisper(bundled_tiny_en(), folder / "tiny.en")), repository)
    return repository


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="clip")
    parser.add_argument("--repository", type=Path, help="A repository built for --family (default: build a small one)")
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=300,
        help="Bound on memory growth from the run's middle third to its last (medians of the samples; "
        "the first third reaches the high-water mark of batch-sized buffers such as ONNX Runtime's arena)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        repository = args.repository or tiny_repository(args.family, Path(folder))
        cases = FAMILIES[args.family]()
        server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        server.start().wait_until_ready(600)
        try:
            # Warm-up: valid requests only first, so batches reach their largest size (and the
            # buffers sized by it their high-water mark), then the mix.
            valid = [case for case in cases if case.valid]
            for subset, seconds in ((valid, 20.0), (cases, 10.0)):
                asyncio.run(
                    soak(
                        server.grpc_url,
                        subset,
                        min(seconds, args.duration),
                        args.concurrency,
                        args.timeout,
                        server.process.pid,
                    )
                )
            before = process_tree_rss(server.process.pid)
            result = asyncio.run(
                soak(server.grpc_url, cases, args.duration, args.concurrency, args.timeout, server.process.pid)
            )
            after = process_tree_rss(server.process.pid)
            labels = {pid: process_label(pid) for pid in after}
            alive = server.process.poll() is None
        finally:
            server.stop()
    growth_mb = (sum(after.values()) - sum(before.values())) / 2**20
    timeline = result["rss_mb_timeline"]
    late_growth_mb = settled_growth_mb([mb for _, mb in timeline])
    timeouts = sum(c["timeout"] for c in result["counts"].values())
    report = {
        **result,
        "family": args.family,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "rss_mb_before": round(sum(before.values()) / 2**20, 1),
        "rss_mb_after": round(sum(after.values()) / 2**20, 1),
        "rss_growth_mb": round(growth_mb, 1),
        "rss_growth_mb_last_third": round(late_growth_mb, 1),
        "processes": len(after),
        "rss_growth_mb_by_process": {
            labels[pid]: round((after[pid] - before.get(pid, 0)) / 2**20, 1) for pid in sorted(after)
        },
        "server_alive": alive,
        "timeouts": timeouts,
    }
    violations = []
    if result["unexpected_total"]:
        violations.append(f"{result['unexpected_total']} requests answered wrongly")
    if timeouts:
        violations.append(f"{timeouts} requests timed out")
    if late_growth_mb > args.max_rss_growth_mb:
        violations.append(f"memory grew by {late_growth_mb:.0f} MB in the last third > {args.max_rss_growth_mb:.0f} MB")
    if not alive:
        violations.append("tritonserver died")
    report["violations"] = violations
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
