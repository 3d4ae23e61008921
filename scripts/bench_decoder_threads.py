#!/usr/bin/env python
"""The chat decoder's torch threads, before and after, side by side in one run.

One tiny-LLaVA repository (the tests' model) built with two instances of every model, served
twice on a real tritonserver: once with the decoder's `intra_op_threads` set to every core (what
torch takes when nobody tells it: what decoders did before they set their threads), once as built
(each instance its share of the cores). Each serving answers the same concurrent requests (one
image and a question each, up to `--new-tokens` tokens, greedy) and reports per-request latency
(median, p95 and max), completion tokens per second and the ratio of the two settings.

    python scripts/bench_decoder_threads.py [--requests 12] [--concurrency 12] [--new-tokens 256] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tritonkit.build import build
from tritonkit.calibration import synthetic_photo
from tritonkit.client import TritonkitClient, chat_inputs
from tritonkit.engines import usable_cores
from tritonkit.families.llava import make_tiny_llava
from tritonkit.reporting import machine, markdown_table, replace_section
from tritonkit.repository import BatchingOverrides
from tritonkit.server import TritonServer, free_port

QUESTIONS = ["What is in the picture?", "Describe the colours.", "Write a long story about this image."]


def with_decoder_threads(repository: Path, threads: int) -> None:
    """Set the decoder's `intra_op_threads` parameter (through the config schema)."""
    path = repository / "llava_decoder" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.parameters["intra_op_threads"].string_value = str(threads)
    path.write_text(text_format.MessageToString(config))


def serve_and_measure(repository: Path, requests: int, concurrency: int, new_tokens: int) -> dict:
    server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server.start().wait_until_ready(300)
    try:
        images = [synthetic_photo(i, 96 + 16 * (i % 3), 128) for i in range(requests)]

        def one(i: int) -> tuple[float, int]:
            with TritonkitClient(server.grpc_url, timeout_s=600) as client:
                inputs = chat_inputs(images[i], QUESTIONS[i % len(QUESTIONS)], max_new_tokens=new_tokens)
                began = time.perf_counter()
                result = client.infer("llava_chat", inputs)
                return time.perf_counter() - began, int(result["COMPLETION_TOKENS"].reshape(-1)[0])

        one(0)  # warm-up
        began = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - began
    finally:
        server.stop()
    latencies = sorted(seconds for seconds, _ in answers)
    tokens = sum(count for _, count in answers)
    return {
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "max_s": latencies[-1],
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    cores = usable_cores()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as folder:
        model = make_tiny_llava(Path(folder) / "model")
        built = Path(folder) / "repo"
        build("llava", str(model), built, overrides=BatchingOverrides(instances=args.instances))
        settings = {
            f"torch's default ({cores} threads per instance)": cores,
            f"its share ({max(1, cores // args.instances)} per instance)": 0,
        }
        for label, threads in settings.items():
            with_decoder_threads(built, threads)  # 0: the decoder's own rule, as built
            results[label] = serve_and_measure(built, args.requests, args.concurrency, args.new_tokens)
            print(label, {k: round(v, 3) for k, v in results[label].items()}, flush=True)
    before, after = results.values()
    rows = [
        [label, f"{r['p50_s']:.2f}", f"{r['p95_s']:.2f}", f"{r['max_s']:.2f}", r["tokens"], f"{r['tokens_per_s']:.0f}"]
        for label, r in results.items()
    ]
    lines = [
        f"Tiny LLaVA (the tests' model), decoder with {args.instances} instances on {cores} cores, {args.requests} "
        f"requests at concurrency {args.concurrency}, up to {args.new_tokens} new tokens each, greedy; one run, both "
        f"settings served in turn from the same repository (`python scripts/bench_decoder_threads.py`). "
        f"Machine: {machine()['processor']}, {cores} cores.",
        "",
        *markdown_table(["decoder threads", "p50 s", "p95 s", "max s", "tokens", "tokens/s"], rows, 1),
        "",
        f"Median latency: {before['p50_s'] / after['p50_s']:.1f}x lower with each instance's share; tokens/s "
        f"{after['tokens_per_s'] / before['tokens_per_s']:.1f}x.",
    ]
    print("\n".join(lines))
    if args.markdown:
        replace_section(args.markdown, "decoder-threads", "Chat decoder threads (before and after)", lines)


if __name__ == "__main__":
    main()
