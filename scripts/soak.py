#!/usr/bin/env python
"""Soak test: mixed valid and invalid requests at concurrency 16 against a served CLIP repository.

Checks, for the whole run: no valid request fails, every invalid request is answered with an
error, no request hangs (client timeouts are counted), and the resident memory of tritonserver
and its Python-backend stubs stays within a bound. Exits 1 on any violation; prints a JSON report.

    python scripts/soak.py [--repository REPO] [--duration 600] [--concurrency 16] [--max-rss-growth-mb 300]

Without --repository it builds the tiny random CLIP first.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.server import TritonServer, free_port, process_tree_rss  # noqa: E402


def requests() -> list[tuple[str, str, np.ndarray, bool]]:
    """(label, model, input array, valid?) — what real clients send, good and bad."""
    import io

    from PIL import Image

    from tritonkit.families.clip import synthetic_photo

    def image(data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)[None, :] if data else np.zeros((1, 0), dtype=np.uint8)

    def text(raw: bytes) -> np.ndarray:
        return np.array([[raw]], dtype=object)

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(png, format="PNG")
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG")
    jpeg = synthetic_photo(3)
    return [
        ("jpeg", "clip_image", image(jpeg), True),
        ("png", "clip_image", image(png.getvalue()), True),
        ("photo", "clip_image", image(synthetic_photo(4, 720, 1280)), True),
        ("text", "clip_text", text("a photo of a cat".encode()), True),
        ("long text", "clip_text", text(("word " * 20000).encode()), True),
        ("empty image", "clip_image", image(b""), False),
        ("truncated jpeg", "clip_image", image(jpeg[: len(jpeg) // 3]), False),
        ("random bytes", "clip_image", image(np.random.default_rng(1).bytes(5000)), False),
        ("pdf", "clip_image", image(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"), False),
        ("decompression bomb", "clip_image", image(bomb.getvalue()), False),
        ("non-utf8 text", "clip_text", text(b"\xff\xfe\xfd bad"), False),
    ]


async def soak(url: str, duration: float, concurrency: int, timeout: float) -> dict:
    import tritonclient.grpc.aio as grpcclient

    from tritonkit.dtypes import wire_datatype

    cases = requests()
    client = grpcclient.InferenceServerClient(url)
    counts = {label: {"sent": 0, "ok": 0, "error": 0, "timeout": 0} for label, *_ in cases}
    unexpected: list[str] = []
    deadline = time.perf_counter() + duration
    rng = random.Random(0)

    async def worker():
        while time.perf_counter() < deadline:
            label, model, array, valid = rng.choice(cases)
            name = "IMAGE" if model == "clip_image" else "TEXT"
            tensor = grpcclient.InferInput(name, list(array.shape), wire_datatype(array))
            tensor.set_data_from_numpy(array)
            counts[label]["sent"] += 1
            try:
                await client.infer(model, [tensor], client_timeout=timeout)
                counts[label]["ok"] += 1
                if not valid:
                    unexpected.append(f"{label}: answered without an error")
            except Exception as exc:
                text = str(exc)
                if "Deadline" in text or "timed out" in text.lower():
                    counts[label]["timeout"] += 1
                else:
                    counts[label]["error"] += 1
                    if valid:
                        unexpected.append(f"{label}: {text.strip().splitlines()[0][:200]}")

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return {"counts": counts, "unexpected": unexpected[:20], "unexpected_total": len(unexpected)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--max-rss-growth-mb", type=float, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        repository = args.repository
        if repository is None:
            from tritonkit.build import build
            from tritonkit.tiny import make_tiny_clip

            repository = Path(folder) / "repo"
            build("clip", str(make_tiny_clip(Path(folder) / "clip")), repository)
        server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        server.start().wait_until_ready(600)
        try:
            asyncio.run(soak(server.grpc_url, min(10.0, args.duration), args.concurrency, args.timeout))  # warm-up
            before = process_tree_rss(server.process.pid)
            result = asyncio.run(soak(server.grpc_url, args.duration, args.concurrency, args.timeout))
            after = process_tree_rss(server.process.pid)
            alive = server.process.poll() is None
        finally:
            server.stop()
    growth_mb = (sum(after.values()) - sum(before.values())) / 2**20
    timeouts = sum(c["timeout"] for c in result["counts"].values())
    report = {
        **result,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "rss_mb_before": round(sum(before.values()) / 2**20, 1),
        "rss_mb_after": round(sum(after.values()) / 2**20, 1),
        "rss_growth_mb": round(growth_mb, 1),
        "processes": len(after),
        "server_alive": alive,
        "timeouts": timeouts,
    }
    violations = []
    if result["unexpected_total"]:
        violations.append(f"{result['unexpected_total']} requests answered wrongly")
    if timeouts:
        violations.append(f"{timeouts} requests timed out")
    if growth_mb > args.max_rss_growth_mb:
        violations.append(f"memory grew by {growth_mb:.0f} MB > {args.max_rss_growth_mb:.0f} MB")
    if not alive:
        violations.append("tritonserver died")
    report["violations"] = violations
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
