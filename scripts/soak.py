#!/usr/bin/env python
"""Soak test: mixed valid and invalid requests at concurrency 16 against a served CLIP, Whisper or LLaVA repository.

Checks, for the whole run: no valid request fails, every invalid request is answered with an
error of its own (a short message, not a broken stream or a lost connection), no request hangs (client timeouts are counted), and the resident memory of tritonserver
and its Python-backend stubs levels off (the median of the last third of the run within a bound
of the middle third's; the first third fills batch-sized buffers, shown per process in the report). Exits 1 on any
violation; prints a JSON report.

    python scripts/soak.py [--family clip|whisper|llava|all] [--repository REPO] [--duration 600] [--concurrency 16]
                           [--max-rss-growth-mb 300] [--gateway] [--long] [--plot FILE] [--json FILE]

Memory is resident memory per model (PSS of tritonserver and of each model's stubs), sampled every
10 s; `--long` is the memory soak: 30 minutes and a plot of every model's timeline (soak-FAMILY.png).
The report's `rss_mb_settled` (per model, the median of the last third) and `average_batch` are what
`tritonkit plan REPO --measure REPORT` compares its prediction with.

Without --repository it builds one first: the tiny random CLIP or LLaVA, or Whisper tiny.en from the bundled
weights (`all`: the three in one repository). With --gateway the same mix goes over HTTP through the
OpenAI-compatible gateway (`tritonkit openai`) in front of the server: every valid request must get a
200, every invalid one a 4xx in OpenAI's error envelope with a short message of its own (never a 5xx,
a dropped connection or a timeout), and the gateway's memory is reported beside the server's.
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

from tritonkit.gateway import spawn_gateway
from tritonkit.memory import average_batches, resident_by_model, resident_bytes
from tritonkit.server import TritonServer, free_port


class Case(NamedTuple):
    label: str
    model: str
    inputs: dict[str, np.ndarray]
    valid: bool


class HttpCase(NamedTuple):
    """One gateway request: a JSON body, or multipart form fields and a file."""

    label: str
    path: str
    valid: bool
    json: dict | None = None
    form: dict | None = None
    file: bytes | None = None
    raw: bytes | None = None  # a body sent as it is (not JSON)


def byte_row(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)[None, :] if data else np.zeros((1, 0), dtype=np.uint8)


def string(raw: bytes) -> np.ndarray:
    return np.array([[raw]], dtype=object)


def clip_cases() -> list[Case]:
    """What real clients of the CLIP ensembles send, good and bad."""
    import io

    from PIL import Image

    from tritonkit.calibration import synthetic_photo

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
    # a long file: the sentence again and again with a second of silence between, about 150 s
    pause = np.zeros(rate, np.float32)
    long_file = encoded(
        np.concatenate([np.concatenate([decoded, pause])] * max(1, 150 * rate // (len(decoded) + rate))), rate, "WAV"
    )
    timestamps = {"TIMESTAMPS": np.array([[True]], dtype=bool)}
    return [
        Case("speech wav", "whisper", audio(speech), True),
        Case("long speech, 150 s", "whisper", audio(long_file), True),
        Case("long speech, 150 s, long-form with timestamps", "whisper", {**audio(long_file), **timestamps}, True),
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
    from tritonkit.calibration import synthetic_photo
    from tritonkit.client import chat_inputs

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


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def gateway_cases(family: str) -> list[HttpCase]:
    """The gRPC cases as OpenAI API calls, plus what only HTTP clients get wrong."""
    cases: list[HttpCase] = []
    if family in ("clip", "all"):
        for case in clip_cases():
            if case.model == "clip_image":
                item = (
                    data_url(case.inputs["IMAGE"].tobytes()) if case.inputs["IMAGE"].size else "data:image/png;base64,"
                )
            else:
                raw = case.inputs["TEXT"][0, 0]
                if not case.valid:  # JSON carries text, not bytes: an HTTP client's bad text is something else
                    continue
                item = raw.decode()
            cases.append(
                HttpCase(f"embeddings {case.label}", "/v1/embeddings", case.valid, {"model": "clip", "input": item})
            )
        cases += [
            HttpCase(
                "embeddings batch", "/v1/embeddings", True, {"model": "clip", "input": ["a cat", "a dog", "a car"]}
            ),
            HttpCase(
                "embeddings base64",
                "/v1/embeddings",
                True,
                {"model": "clip", "input": "x", "encoding_format": "base64"},
            ),
            HttpCase(
                "embeddings dimensions", "/v1/embeddings", False, {"model": "clip", "input": "x", "dimensions": 8}
            ),
            HttpCase("embeddings unknown model", "/v1/embeddings", False, {"model": "nope", "input": "x"}),
            HttpCase("embeddings token arrays", "/v1/embeddings", False, {"model": "clip", "input": [[1, 2, 3]]}),
            HttpCase(
                "embeddings remote URL",
                "/v1/embeddings",
                False,
                {"model": "clip", "input": "https://example.com/a.jpg", "modality": "image"},
            ),
            HttpCase("not JSON", "/v1/embeddings", False, raw=b"{not json"),
        ]
    if family in ("whisper", "all"):
        for case in whisper_cases():
            form = {"model": "whisper"}
            for name in ("LANGUAGE", "TASK"):
                if name in case.inputs:
                    form[name.lower()] = case.inputs[name][0, 0].decode()
            path = (
                "/v1/audio/translations"
                if form.pop("task", "transcribe") != "transcribe"
                else "/v1/audio/transcriptions"
            )
            if path.endswith("translations"):  # an unknown task has no HTTP form: ask for an unknown format instead
                path, form["response_format"] = "/v1/audio/transcriptions", "summary"
            cases.append(
                HttpCase(f"audio {case.label}", path, case.valid, form=form, file=case.inputs["AUDIO"].tobytes())
            )
        speech = next(c for c in cases if c.label == "audio speech wav").file
        for fmt in ("text", "srt", "vtt", "verbose_json"):
            cases.append(
                HttpCase(
                    f"audio {fmt}",
                    "/v1/audio/transcriptions",
                    True,
                    form={"model": "whisper", "response_format": fmt},
                    file=speech,
                )
            )
        cases += [
            HttpCase(
                "audio word timestamps",
                "/v1/audio/transcriptions",
                False,
                form={"model": "whisper", "response_format": "verbose_json", "timestamp_granularities[]": "word"},
                file=speech,
            ),
            HttpCase("audio no file", "/v1/audio/transcriptions", False, form={"model": "whisper"}),
        ]
    if family in ("llava", "all"):
        from tritonkit.calibration import synthetic_photo

        photo = data_url(synthetic_photo(5, 120, 160))

        def chat(text: str, image: str = photo, **options) -> dict:
            content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]
            return {"model": "llava", "max_tokens": 8, "messages": [{"role": "user", "content": content}], **options}

        cases += [
            HttpCase("chat greedy", "/v1/chat/completions", True, chat("What is in the picture?")),
            HttpCase(
                "chat sampled", "/v1/chat/completions", True, chat("Describe it.", temperature=0.7, top_p=0.9, seed=3)
            ),
            HttpCase("chat streamed", "/v1/chat/completions", True, chat("Describe it.", stream=True)),
            HttpCase(
                "chat conversation",
                "/v1/chat/completions",
                True,
                {
                    **chat("What?"),
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        *chat("What?")["messages"],
                        {"role": "assistant", "content": "A boat."},
                        {"role": "user", "content": "And the sky?"},
                    ],
                },
            ),
            HttpCase(
                "chat no image",
                "/v1/chat/completions",
                False,
                {"model": "llava", "messages": [{"role": "user", "content": "hi"}]},
            ),
            HttpCase("chat pdf image", "/v1/chat/completions", False, chat("What?", data_url(b"%PDF-1.4\n"))),
            HttpCase(
                "chat 1x20000 image",
                "/v1/chat/completions",
                False,
                chat("What?", data_url(elongated_png(), "image/png")),
            ),
            HttpCase("chat prompt beyond the context", "/v1/chat/completions", False, chat("word " * 3000)),
            HttpCase("chat temperature 5", "/v1/chat/completions", False, chat("What?", temperature=5.0)),
            HttpCase("chat bad base64", "/v1/chat/completions", False, chat("What?", "data:image/png;base64,@@@")),
        ]
    return cases


async def soak_gateway(
    base: str, cases: list[HttpCase], duration: float, concurrency: int, timeout: float, memory: MemorySampler
) -> dict:
    """The mix over HTTP: valid -> 200, invalid -> 4xx in OpenAI's envelope with a short message."""
    import httpx

    counts = {case.label: {"sent": 0, "ok": 0, "error": 0, "timeout": 0} for case in cases}
    statuses: dict[str, int] = {}
    unexpected: list[str] = []
    deadline = time.perf_counter() + duration
    rng = random.Random(0)
    client = httpx.AsyncClient(base_url=base, timeout=timeout, limits=httpx.Limits(max_connections=concurrency))

    async def send(case: HttpCase) -> httpx.Response:
        if case.raw is not None:
            return await client.post(case.path, content=case.raw, headers={"Content-Type": "application/json"})
        if case.json is not None:
            if case.json.get("stream"):
                async with client.stream("POST", case.path, json=case.json) as response:
                    body = b"".join([chunk async for chunk in response.aiter_bytes()])
                    if response.status_code == 200 and not body.rstrip().endswith(b"data: [DONE]"):
                        raise RuntimeError("the event stream did not end with data: [DONE]")
                    return httpx.Response(response.status_code, content=body)
            return await client.post(case.path, json=case.json)
        files = {"file": ("audio", case.file)} if case.file is not None else None
        return await client.post(case.path, data=case.form or {}, files=files)

    async def worker():
        while time.perf_counter() < deadline:
            case = rng.choice(cases)
            counts[case.label]["sent"] += 1
            try:
                response = await send(case)
            except httpx.TimeoutException:
                counts[case.label]["timeout"] += 1
                continue
            except Exception as exc:  # a dropped connection or a broken stream: lost
                counts[case.label]["error"] += 1
                unexpected.append(f"{case.label}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if response.status_code == 200:
                counts[case.label]["ok"] += 1
                if not case.valid:
                    unexpected.append(f"{case.label}: answered 200")
                continue
            counts[case.label]["error"] += 1
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = None
            if case.valid:
                unexpected.append(f"{case.label}: HTTP {response.status_code}: {response.text[:200]}")
            elif not 400 <= response.status_code < 500 or not message or len(message) > MAX_ERROR_CHARS:
                unexpected.append(f"{case.label}: HTTP {response.status_code} without a short error of its own")

    timeline: list[dict] = []
    try:
        await asyncio.gather(memory.sample(deadline, timeline), *(worker() for _ in range(concurrency)))
    finally:
        await client.aclose()
    return {
        "counts": counts,
        "statuses": statuses,
        "unexpected": unexpected[:20],
        "unexpected_total": len(unexpected),
        "rss_mb_timeline": timeline,
    }


# What an invalid request must not get instead of its own error: the server or the stream broke.
TRANSPORT_FAILURES = ("Stream removed", "Socket closed", "failed to connect", "Connection reset", "metadata size")
MAX_ERROR_CHARS = 1100  # tritonkit.errors.MAX_MESSAGE_CHARS plus the ensemble's prefix


async def soak(
    url: str, cases: list[Case], duration: float, concurrency: int, timeout: float, memory: MemorySampler
) -> dict:
    import tritonclient.grpc.aio as grpcclient

    from tritonkit.dtypes import wire_datatype

    client = grpcclient.InferenceServerClient(url)
    counts = {case.label: {"sent": 0, "ok": 0, "error": 0, "timeout": 0, "slowest_s": 0.0} for case in cases}
    unexpected: list[str] = []
    deadline = time.perf_counter() + duration
    rng = random.Random(0)

    async def worker():
        while time.perf_counter() < deadline:
            case = rng.choice(cases)
            started = time.perf_counter()
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
            slowest = max(counts[case.label]["slowest_s"], time.perf_counter() - started)
            counts[case.label]["slowest_s"] = round(slowest, 2)

    timeline: list[dict] = []
    try:
        await asyncio.gather(memory.sample(deadline, timeline), *(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return {
        "counts": counts,
        "unexpected": unexpected[:20],
        "unexpected_total": len(unexpected),
        "rss_mb_timeline": timeline,
    }


def server_batches(metrics_url: str) -> dict[str, float]:
    """Average rows per execution of each model over the whole soak (Triton's counters)."""
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            return average_batches(response.read().decode())
    except OSError:
        return {}


def settled_mb(timeline: list[dict], label: str) -> float:
    """A model's resident MB once warm: the median of the run's last third."""
    samples = [sample["mb"].get(label, 0.0) for sample in timeline]
    return float(np.median(samples[-max(len(samples) // 3, 1) :])) if samples else 0.0


def plot_memory(report: dict, path: Path) -> None:
    """Resident memory per model and in all over the run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["rss_mb_timeline"]
    seconds = [sample["t"] for sample in timeline]
    figure, axis = plt.subplots(figsize=(10, 5))
    axis.plot(seconds, [sample["total_mb"] for sample in timeline], label="all", linewidth=2, color="black")
    for label in report["rss_mb_settled"]:
        axis.plot(seconds, [sample["mb"].get(label, 0.0) for sample in timeline], label=label)
    axis.set_xlabel("seconds into the soak (after the warm-up)")
    axis.set_ylabel("resident MB")
    axis.set_title(
        f"{report['family']} over {report['path']}, concurrency {report['concurrency']}: "
        f"growth middle -> last third {report['rss_growth_mb_last_third']:+.0f} MB"
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class MemorySampler:
    """Resident memory per model (tritonserver, each model's stubs, the gateway) every `every` seconds."""

    def __init__(self, server_pid: int, every: float, gateway_pid: int | None = None):
        self.server_pid, self.every, self.gateway_pid = server_pid, every, gateway_pid
        self.began = time.perf_counter()

    def now(self) -> dict[str, int]:
        sizes = resident_by_model(self.server_pid)
        if self.gateway_pid is not None:
            sizes["gateway"] = resident_bytes(self.gateway_pid) or 0
        return sizes

    async def sample(self, deadline: float, timeline: list[dict]) -> None:
        while time.perf_counter() < deadline:
            sizes = self.now()
            timeline.append(
                {
                    "t": round(time.perf_counter() - self.began),
                    "total_mb": round(sum(sizes.values()) / 2**20),
                    "mb": {label: round(size / 2**20, 1) for label, size in sorted(sizes.items())},
                }
            )
            await asyncio.sleep(self.every)


def settled_growth_mb(samples: list[float]) -> float:
    """Median memory of the run's last third minus that of its middle third. Medians ignore the
    moments a large request's buffers are alive; the first third fills batch-sized buffers."""
    if len(samples) < 3:
        return 0.0
    third = len(samples) // 3
    return float(np.median(samples[-third:]) - np.median(samples[third : 2 * third]))


def floor_growth_mb(samples: list[float], percentile: float = 10) -> float:
    """The low percentile of the last third minus the middle third's: the memory kept between large
    requests, which a leak or fragmentation raises and a busy moment does not."""
    if len(samples) < 3:
        return 0.0
    third = len(samples) // 3
    return float(np.percentile(samples[-third:], percentile) - np.percentile(samples[third : 2 * third], percentile))


def tiny_repository(family: str, folder: Path) -> Path:
    """The tiny random CLIP or LLaVA, or the bundled real Whisper tiny.en, built into a repository."""
    from tritonkit.build import build

    repository = folder / "repo"
    if family == "all":  # the three built into one repository, as one server serves them
        repository.mkdir(parents=True)
        for name in ("clip", "whisper", "llava"):
            (folder / name).mkdir()
            for model in tiny_repository(name, folder / name).iterdir():
                model.rename(repository / model.name)
        return repository
    if family == "clip":
        from tritonkit.families.clip import make_tiny_clip

        build("clip", str(make_tiny_clip(folder / "clip")), repository)
    elif family == "llava":
        from tritonkit.families.llava import make_tiny_llava

        build("llava", str(make_tiny_llava(folder / "llava")), repository)
    else:
        from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper

        build("whisper", str(convert_ct2_whisper(bundled_tiny_en(), folder / "tiny.en")), repository)
    return repository


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=[*sorted(FAMILIES), "all"], default="clip")
    parser.add_argument("--gateway", action="store_true", help="Send the mix over HTTP through the OpenAI gateway")
    parser.add_argument("--repository", type=Path, help="A repository built for --family (default: build a small one)")
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument(
        "--long", action="store_true", help="The memory soak: 30 minutes, memory every 10 s, a plot (soak-FAMILY.png)"
    )
    parser.add_argument(
        "--sample-every", type=float, help="Seconds between memory samples (default: 10, or 1/30 of the run)"
    )
    parser.add_argument("--plot", type=Path, help="Write the per-model memory timeline as a PNG plot")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--timeout",
        type=float,
        default=180,
        help="Seconds after which a request counts as hung (16 concurrent 150 s long-form files share 2 cores: "
        "a minute each is not a hang)",
    )
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=300,
        help="Bound on memory growth from the run's middle third to its last (medians of the samples; "
        "the first third reaches the high-water mark of batch-sized buffers such as ONNX Runtime's arena)",
    )
    parser.add_argument(
        "--allocator",
        default="auto",
        choices=("auto", "jemalloc", "tcmalloc", "glibc"),
        help="tritonserver's and its stubs' allocator (tritonkit.server.ALLOCATORS)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.long:  # the memory soak: 30 minutes, flat within 50 MB (issue 18's bound), a plot
        args.duration = 1800 if args.duration == parser.get_default("duration") else args.duration
        if args.max_rss_growth_mb == parser.get_default("max_rss_growth_mb"):
            args.max_rss_growth_mb = 50
        args.plot = args.plot or Path(f"soak-{args.family}.png")
    every = args.sample_every or min(10.0, max(args.duration / 30, 1.0))
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        repository = args.repository or tiny_repository(args.family, Path(folder))
        families = ["clip", "whisper", "llava"] if args.family == "all" else [args.family]
        cases = [case for family in families for case in FAMILIES[family]()]
        server = TritonServer(
            repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), allocator=args.allocator
        )
        server.start().wait_until_ready(600)
        assert server.process is not None
        gateway = None
        try:
            if args.gateway:
                gateway, base = spawn_gateway(server.grpc_url)
                memory = MemorySampler(server.process.pid, every, gateway.pid)

                def run(subset, seconds):
                    return asyncio.run(soak_gateway(base, subset, seconds, args.concurrency, args.timeout, memory))

                mix: list = gateway_cases(args.family)
            else:
                memory = MemorySampler(server.process.pid, every)

                def run(subset, seconds):
                    return asyncio.run(soak(server.grpc_url, subset, seconds, args.concurrency, args.timeout, memory))

                mix = cases
            # Warm-up: valid requests only first, so batches reach their largest size (and the
            # buffers sized by it their high-water mark), then the mix.
            for subset, seconds in (([case for case in mix if case.valid], 20.0), (mix, 10.0)):
                run(subset, min(seconds, args.duration))
            before = memory.now()
            memory.began = time.perf_counter()
            result = run(mix, args.duration)
            elapsed = time.perf_counter() - memory.began
            after = memory.now()
            batches = server_batches(server.metrics_url)
            alive = server.process.poll() is None and (gateway is None or gateway.poll() is None)
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(timeout=30)
            server.stop()
    timeline = result["rss_mb_timeline"]
    late_growth_mb = settled_growth_mb([sample["total_mb"] for sample in timeline])
    timeouts = sum(c["timeout"] for c in result["counts"].values())
    valid_labels = {case.label for case in mix if case.valid}
    valid_answered = sum(c["ok"] for label, c in result["counts"].items() if label in valid_labels)
    labels = sorted({label for sample in timeline for label in sample["mb"]})
    report = {
        **result,
        "family": args.family,
        "path": "HTTP through the OpenAI gateway" if args.gateway else "gRPC",
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "allocator": args.allocator,
        "valid_per_s": round(valid_answered / elapsed, 3),
        "rss_mb_before": round(sum(before.values()) / 2**20, 1),
        "rss_mb_after": round(sum(after.values()) / 2**20, 1),
        "rss_growth_mb": round((sum(after.values()) - sum(before.values())) / 2**20, 1),
        "rss_growth_mb_last_third": round(late_growth_mb, 1),
        "rss_floor_growth_mb_last_third": round(floor_growth_mb([sample["total_mb"] for sample in timeline]), 1),
        "rss_growth_mb_by_process": {
            label: round((after.get(label, 0) - before.get(label, 0)) / 2**20, 1) for label in sorted(after)
        },
        # per model: the median of the run's last third (what `tritonkit plan --measure` compares with)
        "rss_mb_settled": {label: round(settled_mb(timeline, label), 1) for label in labels},
        "rss_growth_mb_last_third_by_process": {
            label: round(settled_growth_mb([sample["mb"].get(label, 0.0) for sample in timeline]), 1)
            for label in labels
        },
        "rss_floor_growth_mb_last_third_by_process": {
            label: round(floor_growth_mb([sample["mb"].get(label, 0.0) for sample in timeline]), 1) for label in labels
        },
        "average_batch": {model: round(rows, 2) for model, rows in sorted(batches.items())},
        "server_alive": alive,
        "timeouts": timeouts,
    }
    if args.plot:
        plot_memory(report, args.plot)
    violations = []
    if result["unexpected_total"]:
        violations.append(f"{result['unexpected_total']} requests answered wrongly")
    if timeouts:
        violations.append(f"{timeouts} requests timed out")
    if late_growth_mb > args.max_rss_growth_mb:
        violations.append(f"memory grew by {late_growth_mb:.0f} MB in the last third > {args.max_rss_growth_mb:.0f} MB")
    if not alive:
        violations.append("tritonserver or the gateway died")
    report["violations"] = violations
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
