"""`tritonkit bench`: an async load generator that sends what users send, over gRPC to Triton
or over HTTP to the OpenAI gateway (`--openai URL`), so both paths are measured by one tool.

For each concurrency level, `concurrency` coroutines each keep one request in flight (encoded
image or audio bytes, or text, cycled over the given inputs) for a duration or a request count.
Every request's bytes are made unique by default (harmless padding: trailing bytes after an
image, a RIFF chunk in a WAV, trailing spaces after a text), so Triton's response cache and the
gateway's Redis cache do not answer in place of the models; `allow_cache` sends the inputs as
they are. Reported per level: throughput, client latency p50/p90/p99, errors and timeouts, the
client process's CPU share (it competes with the server on small machines), and from Triton's
own statistics, per model of the ensemble: requests, average queue and compute (input, infer,
output) milliseconds per request, response-cache hits, and the batch sizes executed.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tritonkit.dtypes import wire_datatype
from tritonkit.errors import InferenceError, InputError


@dataclass
class ModelBreakdown:
    requests: int
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    cache_hits: int
    batch_sizes: dict[int, int]  # executed batch size -> executions


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    timeouts: int
    seconds: float
    throughput: float  # successful requests per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    client_cpu_share: float  # of the whole machine (all cores)
    models: dict[str, ModelBreakdown] = field(default_factory=dict)
    first_error: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def unique(item: bytes, serial: int, text: bool) -> bytes:
    """`item` with a serial number in bytes its decoder skips, so no cache can answer it."""
    if text:
        # the serial in binary as trailing spaces and tabs: tokenizers strip trailing whitespace
        return item + b" " + bytes(b" \t"[int(bit)] for bit in f"{serial:b}")
    if item[:4] == b"RIFF" and item[8:12] == b"WAVE":  # a chunk WAV readers skip, and the RIFF size grown to match
        chunk = b"tkbn" + (8).to_bytes(4, "little") + serial.to_bytes(8, "little")
        body = item[12:] + chunk
        return b"RIFF" + (len(body) + 4).to_bytes(4, "little") + b"WAVE" + body
    return item + b"\0tritonkit-bench" + serial.to_bytes(8, "little")  # after an image's end marker


def unique_requests(feeds: list[dict[str, np.ndarray]], serial: int) -> dict[str, np.ndarray]:
    feed = feeds[serial % len(feeds)]
    out = {}
    for name, array in feed.items():
        if array.dtype == object:
            out[name] = np.array([[unique(array[0, 0], serial, text=True)]], dtype=object)
        else:
            out[name] = np.frombuffer(unique(array.tobytes(), serial, text=False), dtype=np.uint8)[None, :]
    return out


def model_inputs(config: dict, items: Sequence[bytes]) -> list[dict[str, np.ndarray]]:
    """One request's inputs per item, for a model whose single required input is encoded bytes
    (UINT8 [-1]) or text (STRING [1])."""
    required = [i for i in config["input"] if not i.get("optional")]
    if len(required) != 1:
        raise InputError(
            f"{config['name']}: bench sends one input; this model requires {[i['name'] for i in required]}"
        )
    (spec,) = required
    name, dtype = spec["name"], spec["data_type"]
    if dtype == "TYPE_UINT8":
        return [{name: np.frombuffer(item, dtype=np.uint8)[None, :]} for item in items]
    if dtype == "TYPE_STRING":
        return [{name: np.array([[item]], dtype=object)} for item in items]
    raise InputError(f"{config['name']}: input {name} is {dtype}; bench sends encoded files (UINT8) or text (STRING)")


async def _run_level(
    send: Callable[[int], Awaitable[None]],
    concurrency: int,
    duration_s: float | None,
    count: int | None,
    tick: Callable[[], None],
    first_serial: int = 0,
) -> tuple[list[float], int, int, float, str | None]:
    """`concurrency` workers each keeping one `send(serial)` in flight, serials counted from
    `first_serial`; latencies in ms."""
    latencies: list[float] = []
    errors = timeouts = 0
    first_error: str | None = None
    sent = 0
    start = time.perf_counter()
    deadline = start + duration_s if duration_s else None

    def more() -> bool:
        if count is not None:
            return sent < count
        return deadline is not None and time.perf_counter() < deadline

    async def worker() -> None:
        nonlocal errors, timeouts, sent, first_error
        while more():
            serial = first_serial + sent
            sent += 1
            began = time.perf_counter()
            try:
                await send(serial)
                latencies.append((time.perf_counter() - began) * 1000)
            except Exception as exc:  # counted, and the first one reported
                text = str(exc) or type(exc).__name__
                if "Deadline" in text or "timeout" in text.lower() or "Timeout" in type(exc).__name__:
                    timeouts += 1
                else:
                    errors += 1
                first_error = first_error or text.strip().splitlines()[0][:300]
            tick()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, timeouts, time.perf_counter() - start, first_error


async def _grpc_level(url, model, feeds, allow_cache, concurrency, duration_s, count, timeout_s, tick, first_serial):
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)

    async def send(serial: int) -> None:
        feed = feeds[serial % len(feeds)] if allow_cache else unique_requests(feeds, serial)
        tensors = []
        for name, array in feed.items():
            tensor = grpcclient.InferInput(name, list(array.shape), wire_datatype(array))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        await client.infer(model, tensors, client_timeout=timeout_s)

    try:
        return await _run_level(send, concurrency, duration_s, count, tick, first_serial)
    finally:
        await client.close()


class HttpError(Exception):
    pass


async def _openai_level(
    base, model, kind, items, texts, allow_cache, concurrency, duration_s, count, timeout_s, tick, first_serial
):
    """The same load as OpenAI API calls: embeddings (texts, or images as data URLs),
    transcriptions (multipart audio) or chat (an image and a question)."""
    import base64

    import httpx

    client = httpx.AsyncClient(
        base_url=base.rstrip("/"),
        timeout=timeout_s,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        headers=gateway_headers(),
    )

    def data_url(data: bytes) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(data).decode()

    images = [item for item, is_text in zip(items, texts) if not is_text]
    question = next((item.decode() for item, is_text in zip(items, texts) if is_text), "Describe the image.")
    if kind == "chat" and not images:
        raise InputError("--openai: a chat model needs an image (--input FILE); --text gives the question")

    async def send(serial: int) -> None:
        if kind == "chat":
            item, is_text = images[serial % len(images)], False
        else:
            item, is_text = items[serial % len(items)], texts[serial % len(items)]
        data = item if allow_cache else unique(item, serial, text=is_text)
        if kind == "embeddings":
            body = {"model": model, "encoding_format": "base64", "input": data.decode() if is_text else data_url(data)}
            response = await client.post("/v1/embeddings", json=body)
        elif kind == "transcription":
            response = await client.post(
                "/v1/audio/transcriptions", data={"model": model}, files={"file": ("audio", data)}
            )
        else:
            content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(data)}}]
            body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": content}]}
            response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise HttpError(f"HTTP {response.status_code}: {response.text[:300]}")

    try:
        return await _run_level(send, concurrency, duration_s, count, tick, first_serial)
    finally:
        await client.aclose()


def gateway_headers() -> dict[str, str]:
    """The gateway's key from the environment, as `tritonkit openai` and the openai SDK read it."""
    key = os.environ.get("TRITONKIT_API_KEY") or os.environ.get("OPENAI_API_KEY") or "unused"
    return {"Authorization": f"Bearer {key}"}


def openai_model_kind(base: str, model: str, timeout_s: float = 10) -> str:
    """What the gateway serves under `model`: embeddings, transcription or chat."""
    import httpx

    try:
        response = httpx.get(f"{base.rstrip('/')}/v1/models", headers=gateway_headers(), timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise InferenceError(f"--openai {base}: the gateway does not answer ({type(exc).__name__})") from None
    if response.status_code != 200:
        raise InferenceError(f"--openai {base}: GET /v1/models answered HTTP {response.status_code}")
    kinds = {m["id"]: m.get("kind", "") for m in response.json().get("data", [])}
    if model not in kinds:
        raise InputError(
            f"--openai: the gateway serves no model {model!r} (served: {', '.join(sorted(kinds)) or 'none'})"
        )
    return kinds[model]


def ensemble_models(client, model: str) -> list[str]:
    config = client.get_model_config(model, as_json=True)["config"]
    steps = config.get("ensemble_scheduling", {}).get("step", [])
    return [model] + [s["model_name"] for s in steps]


def _stats(client, models: list[str]) -> dict[str, dict]:
    out = {}
    for name in models:
        for entry in client.get_inference_statistics(name, as_json=True).get("model_stats", []):
            if entry["name"] == name:
                out[name] = entry
    return out


def _settled_stats(client, models: list[str], before: dict, model: str, successes: int, wait_s: float = 5.0) -> dict:
    """Statistics after a level: Triton updates them just after it answers, so read until the
    ensemble has counted every success and two reads agree."""

    def successes_of(stats):
        return int(stats.get(model, {}).get("inference_stats", {}).get("success", {}).get("count", 0))

    deadline = time.monotonic() + wait_s
    previous = _stats(client, models)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        current = _stats(client, models)
        if current == previous and successes_of(current) - successes_of(before) >= successes:
            return current
        previous = current
    return previous


def _breakdown(before: dict, after: dict) -> dict[str, ModelBreakdown]:
    def field_of(entry, key, part="ns"):
        return int(entry.get("inference_stats", {}).get(key, {}).get(part, 0))

    result = {}
    for name, now in after.items():
        then = before.get(name, {})
        requests = field_of(now, "success", "count") - field_of(then, "success", "count")

        def per_request_ms(key, now=now, then=then, requests=requests):
            return (field_of(now, key) - field_of(then, key)) / max(requests, 1) / 1e6

        sizes_now = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in now.get("batch_stats", [])}
        sizes_then = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in then.get("batch_stats", [])}
        result[name] = ModelBreakdown(
            requests=requests,
            queue_ms=per_request_ms("queue"),
            compute_input_ms=per_request_ms("compute_input"),
            compute_infer_ms=per_request_ms("compute_infer"),
            compute_output_ms=per_request_ms("compute_output"),
            cache_hits=field_of(now, "cache_hit", "count") - field_of(then, "cache_hit", "count"),
            batch_sizes={b: n - sizes_then.get(b, 0) for b, n in sorted(sizes_now.items()) if n > sizes_then.get(b, 0)},
        )
    return result


def run_bench(
    url: str,
    model: str,
    items: Sequence[bytes],
    concurrencies: Sequence[int],
    *,
    duration_s: float | None = None,
    requests: int | None = None,
    timeout_s: float = 60.0,
    progress: Callable[[str, float], None] | None = None,
    allow_cache: bool = False,
    openai: str | None = None,
    texts: Sequence[bool] | None = None,
) -> list[LevelResult]:
    """Measure each concurrency level in turn against a running server: gRPC to `model` at `url`,
    or, with `openai` (the gateway's base URL), HTTP calls naming `model` as the OpenAI model.
    `texts` marks which items are texts (default: all, when the model takes text). With `openai`,
    the server breakdown is filled when `url` serves the ensemble behind it (else left empty)."""
    import tritonclient.grpc as grpcclient

    if not items:
        raise InputError("bench needs at least one input")
    if duration_s is not None and requests is not None:
        raise InputError("give either a duration or a request count, not both")
    if duration_s is None and requests is None:
        duration_s = 10.0
    if any(c < 1 for c in concurrencies):
        raise InputError("concurrency levels must be >= 1")
    kind = openai_model_kind(openai, model) if openai else None
    sync = grpcclient.InferenceServerClient(url)
    try:
        models: list[str] = []
        feeds: list[dict[str, np.ndarray]] = []
        if kind is None:
            try:
                config = sync.get_model_config(model, as_json=True)["config"]
            except Exception as exc:
                raise InferenceError(f"model {model!r} is not available at {url}: {exc}") from None
            feeds = model_inputs(config, items)
            models = ensemble_models(sync, model)
        flags = list(texts) if texts is not None else [False] * len(items)
        counted = model  # the ensemble whose successes the statistics wait for
        if kind is not None:  # the ensemble behind the OpenAI model, when `url` reaches its server
            counted = {"transcription": model, "chat": f"{model}_chat"}.get(
                kind, f"{model}_text" if all(flags) else f"{model}_image"
            )
            try:
                models = ensemble_models(sync, counted)
            except Exception:
                models = []
        results = []
        # every level, and every run of bench, sends inputs no earlier one sent: a level that
        # repeated the one before would be answered by the response cache
        first_serial = secrets.randbits(40)
        for concurrency in concurrencies:
            done = [0]
            total = requests or 0

            def tick(concurrency=concurrency, done=done, total=total):
                done[0] += 1
                if progress:
                    progress(f"concurrency {concurrency}", done[0] / total if total else 0.0)

            before, cpu_before = _stats(sync, models), _cpu_seconds()
            if kind is None:
                level = _grpc_level(
                    url, model, feeds, allow_cache, concurrency, duration_s, requests, timeout_s, tick, first_serial
                )
            else:
                level = _openai_level(
                    openai,
                    model,
                    kind,
                    items,
                    flags,
                    allow_cache,
                    concurrency,
                    duration_s,
                    requests,
                    timeout_s,
                    tick,
                    first_serial,
                )
            latencies, errors, timeouts, seconds, first_error = asyncio.run(level)
            first_serial += len(latencies) + errors + timeouts
            cpu = (_cpu_seconds() - cpu_before) / seconds / (os.cpu_count() or 1)
            after = _settled_stats(sync, models, before, counted, len(latencies)) if models else {}
            results.append(
                LevelResult(
                    concurrency=concurrency,
                    requests=len(latencies) + errors + timeouts,
                    errors=errors,
                    timeouts=timeouts,
                    seconds=seconds,
                    throughput=len(latencies) / seconds,
                    p50_ms=percentile(latencies, 50),
                    p90_ms=percentile(latencies, 90),
                    p99_ms=percentile(latencies, 99),
                    client_cpu_share=cpu,
                    models=_breakdown(before, after),
                    first_error=first_error,
                )
            )
        return results
    finally:
        sync.close()


def write_json(results: Sequence[LevelResult], path: Path, meta: dict) -> None:
    Path(path).write_text(json.dumps({**meta, "levels": [asdict(r) for r in results]}, indent=2) + "\n")


def write_plot(results: Sequence[LevelResult], path: Path, title: str) -> None:
    """Throughput against p99 latency, one point per concurrency level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r.p99_ms for r in results], [r.throughput for r in results], marker="o")
    for r in results:
        axis.annotate(f"c={r.concurrency}", (r.p99_ms, r.throughput), textcoords="offset points", xytext=(5, 5))
    axis.set_xlabel("p99 latency (ms)")
    axis.set_ylabel("throughput (requests/s)")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def perf_analyzer_command(
    url: str, model: str, input_file: Path, concurrencies: Sequence[int], duration_s: float | None
) -> list[str]:
    """The equivalent perf_analyzer run (gRPC, the same concurrency levels, the same inputs)."""
    binary = shutil.which("perf_analyzer")
    if binary is None:
        raise InputError(
            "--perf-analyzer: no perf_analyzer on PATH", hint="run inside the NGC tritonserver SDK container"
        )
    levels = sorted(set(concurrencies))
    command = [
        binary,
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "--input-data",
        str(input_file),
        "--concurrency-range",
        f"{levels[0]}:{levels[-1]}:{max(1, levels[1] - levels[0]) if len(levels) > 1 else 1}",
    ]
    if duration_s:
        command += ["--measurement-interval", str(int(duration_s * 1000))]
    return command


def perf_analyzer_input(config: dict, items: Sequence[bytes], path: Path) -> Path:
    """perf_analyzer's --input-data JSON holding the same inputs (bytes base64-encoded)."""
    import base64

    (spec,) = [i for i in config["input"] if not i.get("optional")]
    entries = []
    for item in items:
        if spec["data_type"] == "TYPE_UINT8":
            entries.append({spec["name"]: {"b64": base64.b64encode(item).decode(), "shape": [len(item)]}})
        else:
            entries.append({spec["name"]: {"content": [item.decode("utf-8")], "shape": [1]}})
    Path(path).write_text(json.dumps({"data": entries}))
    return Path(path)


def run_perf_analyzer(command: list[str]) -> int:
    return subprocess.run(command).returncode
