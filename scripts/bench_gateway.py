#!/usr/bin/env python
"""CLIP image embeddings at concurrency 16, direct gRPC against the OpenAI gateway, in one run.

One server, one repository (CLIP ViT-B/32 architecture, random weights, FP32), one gateway
(`tritonkit openai`) in front of it. `tritonkit bench` sends the same JPEG photos both ways
(unique bytes per request, so no cache answers): gRPC to `clip_image`, and HTTP
`POST /v1/embeddings` with data URLs (base64 answers, the SDK's default). The two paths are
measured in alternation (gRPC, gateway, gRPC, gateway, ...) so drift on the machine falls on both;
the ratio is of the summed throughputs. Where the time goes: the CPU seconds per request of the
gateway process, the load generator and the server, and the server's own queue and compute times.

    python scripts/bench_gateway.py [--images 32] [--duration 15] [--rounds 2] [--json out.json]
                                    [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.bench import run_bench
from tritonkit.build import build
from tritonkit.calibration import synthetic_photo
from tritonkit.families.clip import make_vit_b32_clip
from tritonkit.gateway import spawn_gateway
from tritonkit.reporting import machine, markdown_table, replace_section
from tritonkit.server import TritonServer, free_port

CONCURRENCY = 16


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that have been waited for."""
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(f) for f in fields[11:15]) / ticks


def tree_cpu_seconds(pid: int) -> float:
    """CPU of `pid` and every live descendant (tritonserver and its Python-backend stubs)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += cpu_seconds(current)
            children = (Path("/proc") / str(current) / "task" / str(current) / "children").read_text().split()
        except OSError:
            continue
        pending += [int(c) for c in children]
    return total


def measure(label, run, server_pid, gateway_pid) -> dict:
    own_before = time.process_time()
    server_before, gateway_before = tree_cpu_seconds(server_pid), cpu_seconds(gateway_pid)
    (level,) = run()
    own = time.process_time() - own_before
    server_cpu = tree_cpu_seconds(server_pid) - server_before
    gateway_cpu = cpu_seconds(gateway_pid) - gateway_before
    done = max(level.requests - level.errors - level.timeouts, 1)
    return {
        "path": label,
        "throughput": level.throughput,
        "seconds": level.seconds,
        "requests": level.requests,
        "errors": level.errors,
        "p50_ms": level.p50_ms,
        "p99_ms": level.p99_ms,
        "cpu_ms_per_request": {
            "server": 1000 * server_cpu / done,
            "gateway": 1000 * gateway_cpu / done,
            "load generator": 1000 * own / done,
        },
        "models": {
            name: {"queue_ms": m.queue_ms, "infer_ms": m.compute_infer_ms, "batch_sizes": m.batch_sizes}
            for name, m in level.models.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    files = [synthetic_photo(seed, 480, 640) for seed in range(args.images)]
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as folder:
        model_dir = make_vit_b32_clip(Path(folder) / "vit-b-32")
        repository = Path(folder) / "repo"
        build("clip", str(model_dir), repository)
        server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        server.start().wait_until_ready(600)
        assert server.process is not None
        gateway, base = spawn_gateway(server.grpc_url)
        try:
            grpc_run = lambda: run_bench(  # noqa: E731
                server.grpc_url, "clip_image", files, [CONCURRENCY], duration_s=args.duration
            )
            http_run = lambda: run_bench(  # noqa: E731
                server.grpc_url, "clip", files, [CONCURRENCY], duration_s=args.duration, openai=base
            )
            run_bench(server.grpc_url, "clip_image", files[:8], [4], requests=16)  # warm-up, both paths
            run_bench(server.grpc_url, "clip", files[:8], [4], requests=16, openai=base)
            runs = []
            for round_ in range(args.rounds):
                for label, run in (("direct gRPC", grpc_run), ("OpenAI gateway", http_run)):
                    runs.append({**measure(label, run, server.process.pid, gateway.pid), "round": round_})
                    print(json.dumps(runs[-1]), flush=True)
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            server.stop()
    result = {
        "machine": machine(),
        "images": args.images,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "runs": runs,
    }
    print(json.dumps(summary(result), indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result)


def summary(result: dict) -> dict:
    def total(path, key):
        return sum(r[key] for r in result["runs"] if r["path"] == path)

    rates = {path: total(path, "requests") / total(path, "seconds") for path in ("direct gRPC", "OpenAI gateway")}
    return {"images_per_s": rates, "gateway_over_grpc": rates["OpenAI gateway"] / rates["direct gRPC"]}


def write_markdown(path: Path, result: dict) -> None:
    figures = summary(result)
    lines = [
        f"{result['images']} JPEG photos (480x640) to CLIP ViT-B/32 (FP32), concurrency {CONCURRENCY}, "
        f"{result['rounds']} alternating rounds of {result['duration_s']:.0f} s per path, "
        f"{result['machine']['cpus']} CPUs shared by the server, the gateway and the load generator. "
        "Command: `python scripts/bench_gateway.py --markdown docs/BENCHMARKS.md`.",
        "",
        f"**Gateway / direct gRPC: {figures['gateway_over_grpc']:.2f}x** "
        f"({figures['images_per_s']['OpenAI gateway']:.1f} vs {figures['images_per_s']['direct gRPC']:.1f} images/s).",
        "",
    ]
    lines += markdown_table(
        ["round", "path", "images/s", "p50 ms", "p99 ms", "CPU ms/request: server", "gateway", "load generator"],
        [
            [
                str(r["round"] + 1),
                r["path"],
                f"{r['throughput']:.1f}",
                f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}",
                f"{r['cpu_ms_per_request']['server']:.1f}",
                f"{r['cpu_ms_per_request']['gateway']:.1f}",
                f"{r['cpu_ms_per_request']['load generator']:.1f}",
            ]
            for r in result["runs"]
        ],
        align_right_from=2,
    )
    replace_section(path, "bench_gateway", "OpenAI gateway vs direct gRPC (CLIP image embeddings)", lines)


if __name__ == "__main__":
    main()
