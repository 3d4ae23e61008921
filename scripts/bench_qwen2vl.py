#!/usr/bin/env python
"""Qwen2-VL image chat, side by side in one run on the same images and prompts:

- transformers `generate` (greedy, the model's own vision tower and language model in PyTorch):
  one request at a time (batch 1), and 8 requests in one left-padded batch;
- the served `NAME_chat` ensemble on a real tritonserver at concurrency 1 and 8 (whole answers for
  tokens/s), and `NAME_chat_stream` at the same concurrency (time to the first piece of text).

Reports completion tokens per wall second and the median time to first token. No Qwen2-VL weights
can be downloaded here: the model is random, built from a Qwen2-VL config scaled down (text hidden
512, 8 layers; vision tower 8 blocks of 256) with real image processing (each photo's own grid,
up to 256 visual tokens); speed does not depend on the weights, and `min_new_tokens` makes every
answer as long.

    python scripts/bench_qwen2vl.py [--requests 16] [--new-tokens 32] [--variant qwen2_vl] [--json out.json] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.build import build
from tritonkit.calibration import synthetic_photo
from tritonkit.client import TritonkitClient
from tritonkit.families import get_family
from tritonkit.families.qwen2vl import make_tiny_qwen_vl
from tritonkit.reporting import machine, markdown_table, replace_section
from tritonkit.server import TritonServer, free_port

PROMPTS = ["What is in the picture?", "Describe the colours.", "How many objects are there?", "Write a caption."]
SIZES = [(336, 448), (448, 336), (280, 280), (224, 392)]


def cases(count: int) -> list[tuple[bytes, str]]:
    return [(synthetic_photo(i, *SIZES[i % len(SIZES)]), PROMPTS[i % len(PROMPTS)]) for i in range(count)]


def transformers_rates(spec, loaded, items, new_tokens: int) -> list[dict]:
    """Completion tokens/s and median time to first token of `generate`, batch 1 and batch 8."""
    import torch
    from PIL import Image
    from transformers.generation.streamers import BaseStreamer

    from tritonkit.families.qwen2vl import image_inputs

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call holds the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    def generate(batch):
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data, _ in batch]
        pixels, grids = image_inputs(loaded, pictures)
        rows = []
        for k, (_, prompt) in enumerate(batch):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            rows.append(spec.prompt_ids(loaded, messages, grids[k : k + 1]))
        longest = max(map(len, rows))
        pad = loaded.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
        streamer = FirstToken()
        start = time.perf_counter()
        with torch.no_grad():
            loaded.model.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=torch.from_numpy(pixels),
                image_grid_thw=torch.from_numpy(grids),
                mm_token_type_ids=(ids == loaded.model.config.image_token_id).int(),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                streamer=streamer,
            )
        return time.perf_counter() - start, (streamer.at - start) if streamer.at else None

    generate(items[:1])  # warm-up
    results = []
    for batch_size in (1, 8):
        elapsed, firsts = 0.0, []
        for i in range(0, len(items), batch_size):
            seconds, first = generate(items[i : i + batch_size])
            elapsed += seconds
            if first is not None:
                firsts.append(first)
        results.append(
            {
                "system": "transformers generate",
                "setting": f"batch {batch_size}",
                "tokens_per_s": len(items) * new_tokens / elapsed,
                "ttft_ms": 1000 * statistics.median(firsts) if firsts else None,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def served_rates(repository: Path, family: str, items, new_tokens: int) -> list[dict]:
    server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server.start().wait_until_ready(600)
    results = []
    try:
        options = {"max_new_tokens": new_tokens}

        def whole(item):
            with TritonkitClient(server.grpc_url, timeout_s=600) as client:
                data, prompt = item
                answer = client.infer(f"{family}_chat", _inputs(data, prompt, new_tokens))
                return int(answer["COMPLETION_TOKENS"][0, 0])

        def first_piece(item):
            with TritonkitClient(server.grpc_url, timeout_s=600) as client:
                start = time.perf_counter()
                for _ in client.chat_stream(item[0], item[1], model=f"{family}_chat_stream", **options):
                    return time.perf_counter() - start
            return float("nan")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(whole, items[:8]))  # warm-up
        for concurrency in (1, 8):
            with ThreadPoolExecutor(concurrency) as pool:
                start = time.perf_counter()
                tokens = sum(pool.map(whole, items))
                elapsed = time.perf_counter() - start
                firsts = list(pool.map(first_piece, items))
            results.append(
                {
                    "system": "tritonkit ensemble",
                    "setting": f"concurrency {concurrency}",
                    "tokens_per_s": tokens / elapsed,
                    "ttft_ms": 1000 * statistics.median(firsts),
                    "completion_tokens": tokens,
                }
            )
            print(json.dumps(results[-1]), flush=True)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as page:
            (repository.parent / "metrics.txt").write_bytes(page.read())
    finally:
        server.stop()
    return results


def plan_check(repository: Path) -> list[dict]:
    """`tritonkit plan REPO --measure` on the metrics page the served run left: each model's
    predicted resident memory beside what it held."""
    import subprocess

    out = repository.parent / "plan.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "plan",
            str(repository),
            "--measure",
            str(repository.parent / "metrics.txt"),
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return json.loads(out.read_text()).get("measured", [])


def _inputs(data: bytes, prompt: str, new_tokens: int) -> dict[str, np.ndarray]:
    from tritonkit.client import chat_inputs

    return chat_inputs(data, prompt, max_new_tokens=new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--variant", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    family = {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2_5vl"}[args.variant]
    items = cases(args.requests)
    with tempfile.TemporaryDirectory(prefix="bench-qwen-") as folder:
        # init_std 0.02 (a trained model's scale) so the random model does not end at once; every
        # answer is held to the same length anyway (min_new_tokens in generate, checked served)
        model_dir = make_tiny_qwen_vl(
            Path(folder) / "model",
            variant=args.variant,
            text_hidden=512,
            vision_hidden=256,
            layers=8,
            heads=8,
            max_image_tokens=256,
            init_std=0.02,
        )
        spec = get_family(family)
        loaded = spec.load(str(model_dir))
        rows = transformers_rates(spec, loaded, items, args.new_tokens)
        repository = Path(folder) / "repo"
        build(family, str(model_dir), repository)
        rows += served_rates(repository, family, items, args.new_tokens)
        memory = plan_check(repository)
    result = {"machine": machine(), "variant": args.variant, "requests": args.requests, "new_tokens": args.new_tokens}
    result["rows"] = rows
    result["memory"] = memory
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result)


def write_markdown(path: Path, result: dict) -> None:
    rows = result["rows"]
    by = {(r["system"], r["setting"]): r for r in rows}
    served = [r for r in rows if r["system"] == "tritonkit ensemble"]
    lines = [
        f"{result['requests']} requests (photos of 4 sizes up to 448x336, one image and a short question each), "
        f"{result['new_tokens']} new tokens each, greedy; {result['variant']} scaled down (text hidden 512, 8 layers; "
        f"vision 8 blocks of 256; random weights), {result['machine']['cpus']} CPUs. Command: "
        "`python scripts/bench_qwen2vl.py --markdown docs/BENCHMARKS.md`. Served answers whose completion "
        "tokens fell short of the target are counted as they are (the table's tokens/s divides the tokens "
        "actually generated).",
        "",
    ]
    lines += markdown_table(
        ["system", "setting", "completion tokens/s", "median time to first token (ms)"],
        [
            [r["system"], r["setting"], f"{r['tokens_per_s']:.1f}", f"{r['ttft_ms']:.0f}" if r["ttft_ms"] else "-"]
            for r in rows
        ],
        align_right_from=2,
    )
    one, eight = by[("transformers generate", "batch 1")], by[("transformers generate", "batch 8")]
    for r in served:
        alike = one if r["setting"] == "concurrency 1" else eight  # the same number of requests at once
        lines.append("")
        lines.append(
            f"Served at {r['setting']}: **{r['tokens_per_s'] / one['tokens_per_s']:.2f}x** transformers batch 1 "
            f"and **{r['tokens_per_s'] / eight['tokens_per_s']:.2f}x** batch 8 in tokens/s; time to first token "
            f"**{r['ttft_ms'] / alike['ttft_ms']:.2f}x** transformers {alike['setting']}'s."
        )
    if result.get("memory"):
        lines += ["", "`tritonkit plan REPO --measure` after the served runs (resident memory per model, MiB):", ""]
        lines += markdown_table(
            ["model", "predicted", "measured", "error"],
            [
                [
                    c["model"],
                    f"{c['predicted_bytes'] / 2**20:.0f}",
                    f"{c['measured_bytes'] / 2**20:.0f}",
                    f"{c['error']:+.0%}",
                ]
                for c in result["memory"]
            ],
            align_right_from=1,
        )
    replace_section(path, "bench_qwen2vl", "Qwen2-VL image chat (served vs transformers generate)", lines)


if __name__ == "__main__":
    main()
