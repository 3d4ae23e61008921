"""`tritonkit bench`: an async gRPC load generator that sends what users send.

For each concurrency level, `concurrency` coroutines each keep one request in flight (encoded
image or audio bytes, or text, cycled over the given inputs) for a duration or a request count.
Reported per level: throughput, client latency p50/p90/p99, errors and timeouts, the client
process's CPU share (it competes with the server on small machines), and from Triton's own
statistics, per model of the ensemble: requests, average queue and compute (input, infer,
output) milliseconds per request, and the batch sizes executed.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
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
    url: str,
    model: str,
    requests: list[dict[str, np.ndarray]],
    concurrency: int,
    duration_s: float | None,
    count: int | None,
    timeout_s: float,
    tick: Callable[[], None],
) -> tuple[list[float], int, int, float, str | None]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
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

    async def worker(offset: int) -> None:
        nonlocal errors, timeouts, sent, first_error
        index = offset
        while more():
            sent += 1
            feed = requests[index % len(requests)]
            index += concurrency
            tensors = []
            for name, array in feed.items():
                tensor = grpcclient.InferInput(name, list(array.shape), wire_datatype(array))
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            began = time.perf_counter()
            try:
                await client.infer(model, tensors, client_timeout=timeout_s)
                latencies.append((time.perf_counter() - began) * 1000)
            except Exception as exc:  # counted, and the first one reported
                text = str(exc)
                if "Deadline" in text or "timeout" in text.lower():
                    timeouts += 1
                else:
                    errors += 1
                first_error = first_error or text.strip().splitlines()[0][:300]
            tick()

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await client.close()
    return latencies, errors, timeouts, time.perf_counter() - start, first_error


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
) -> list[LevelResult]:
    """Measure each concurrency level in turn against a running server."""
    import tritonclient.grpc as grpcclient

    if not items:
        raise InputError("bench needs at least one input")
    if duration_s is not None and requests is not None:
        raise InputError("give either a duration or a request count, not both")
    if duration_s is None and requests is None:
        duration_s = 10.0
    if any(c < 1 for c in concurrencies):
        raise InputError("concurrency levels must be >= 1")
    sync = grpcclient.InferenceServerClient(url)
    try:
        try:
            config = sync.get_model_config(model, as_json=True)["config"]
        except Exception as exc:
            raise InferenceError(f"model {model!r} is not available at {url}: {exc}") from None
        feeds = model_inputs(config, items)
        models = ensemble_models(sync, model)
        results = []
        for concurrency in concurrencies:
            done = [0]
            total = requests or 0

            def tick(concurrency=concurrency, done=done, total=total):
                done[0] += 1
                if progress:
                    progress(f"concurrency {concurrency}", done[0] / total if total else 0.0)

            before, cpu_before = _stats(sync, models), _cpu_seconds()
            latencies, errors, timeouts, seconds, first_error = asyncio.run(
                _run_level(url, model, feeds, concurrency, duration_s, requests, timeout_s, tick)
            )
            cpu = (_cpu_seconds() - cpu_before) / seconds / (os.cpu_count() or 1)
            after = _settled_stats(sync, models, before, model, len(latencies))
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
