#!/usr/bin/env python
"""CLIP image embeddings, JPEG in, side by side in one run on the same photos:

- transformers eager: `CLIPProcessor` + `CLIPModel.get_image_features`, batch 16, one process;
- the in-process ceiling: tritonkit's own preprocessing (the repository's DALI pipeline) and the
  same ONNX Runtime graph the repository serves, batch 16, no server;
- the served `clip_image` ensemble on a real tritonserver, `tritonkit bench` at concurrency 16.

For FP32 and INT8 builds on ONNX Runtime and on OpenVINO, and BF16 on OpenVINO where the CPU has
native BF16 (each reduced precision as `tritonkit build --precision ...` picks it, with its
accuracy report on the built-in varied images). The model has the CLIP ViT-B/32 architecture with
random weights (speed does not depend on them). The ceiling is also given as a share of the
machine's FP32 matrix-multiply rate, measured here (numpy's BLAS, all cores).

The ceiling is also given as a share of the matrix-multiply rate of its own precision (FP32, BF16,
INT8), measured here with PyTorch.

    python scripts/bench_clip.py [--images 64] [--duration 20] [--engines onnxruntime,openvino] [--json out.json] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.bench import run_bench
from tritonkit.build import build
from tritonkit.calibration import synthetic_photo
from tritonkit.families.clip import make_vit_b32_clip
from tritonkit.precision import PrecisionOptions
from tritonkit.preprocessing.dali import DaliRunner
from tritonkit.preprocessing.image import ImageRecipe, checked_image_bytes
from tritonkit.reporting import best_seconds, machine, markdown_table, replace_section
from tritonkit.repository import VERSION
from tritonkit.server import TritonServer, free_port
from tritonkit.triton_config import parameter, read_config

BATCH = 16
CONCURRENCY = 16
# multiply-accumulates of one 224x224 image through the ViT-B/32 image tower (timm's 4.4 GMACs)
VIT_B32_GMACS = 4.4


def fp32_gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The FP32 matrix-multiply rate of this machine (numpy's BLAS on all cores), GFLOP/s."""
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def gemm_rates(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Matrix-multiply rates of this machine per precision (PyTorch's oneDNN kernels on all cores:
    AMX or AVX-512 BF16/VNNI where the CPU has them), GFLOP/s (INT8: GOP/s)."""
    import torch

    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b
        rates[name] = 2 * size**3 / min(_timed(lambda a=a, b=b: a @ b) for _ in range(repeats)) / 1e9
    a8 = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    b8 = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    torch._int_mm(a8, b8)
    rates["int8"] = 2 * size**3 / min(_timed(lambda: torch._int_mm(a8, b8)) for _ in range(repeats)) / 1e9
    return rates


def _rate_key(precision: str) -> str:
    return "int8" if precision.startswith("int8") else precision if precision in ("bf16", "fp32") else "fp32"


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def photos(count: int) -> list[bytes]:
    return [synthetic_photo(seed, 480, 640) for seed in range(count)]


def best_rate(function, items: int, repeats: int = 3) -> float:
    return items / best_seconds(function, repeats)


def transformers_eager(model_dir: Path, files: list[bytes]) -> float:
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from tritonkit.families.clip import projected

    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    processor = CLIPProcessor.from_pretrained(str(model_dir))

    def run():
        with torch.no_grad():
            for i in range(0, len(files), BATCH):
                images = [Image.open(io.BytesIO(f)).convert("RGB") for f in files[i : i + BATCH]]
                pixels = processor(images=images, return_tensors="pt")["pixel_values"]
                projected(model.get_image_features(pixel_values=pixels))

    return best_rate(run, len(files))


def in_process_ceiling(repository: Path, files: list[bytes]) -> float:
    """The repository's own preprocessing and encoder graph (on its engine, at its precision),
    called directly in this process."""
    from tritonkit.engines import session_from_parameters

    preprocess = repository / "clip_image_preprocess"
    recipe = ImageRecipe.from_json(parameter(read_config(preprocess), "image_recipe") or "{}")
    runner = DaliRunner((preprocess / VERSION / "model.dali").read_bytes(), BATCH)
    encoder = read_config(repository / "clip_image_encoder")
    parameters = {key: value.string_value for key, value in encoder.parameters.items()}
    graph = parameters.get("model_file", "model.onnx")
    config = {"instance_group": [{"count": g.count} for g in encoder.instance_group]}
    session = session_from_parameters(repository / "clip_image_encoder" / VERSION / graph, parameters, config)

    def run():
        for i in range(0, len(files), BATCH):
            rows = [np.frombuffer(checked_image_bytes(f, recipe), dtype=np.uint8) for f in files[i : i + BATCH]]
            pixels = np.stack([r[0] for r in runner.run_all({"IMAGE": rows})])
            session.run(None, {"PIXEL_VALUES": pixels})

    return best_rate(run, len(files))


def served(repository: Path, files: list[bytes], duration: float) -> tuple[float, dict]:
    server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server.start().wait_until_ready(600)
    try:
        run_bench(server.grpc_url, "clip_image", files[:8], [4], requests=16)  # warm-up
        (level,) = run_bench(server.grpc_url, "clip_image", files, [CONCURRENCY], duration_s=duration)
    finally:
        server.stop()
    breakdown = {
        name: {"queue_ms": m.queue_ms, "infer_ms": m.compute_infer_ms, "batch_sizes": m.batch_sizes}
        for name, m in level.models.items()
    }
    return level.throughput, {
        "p99_ms": level.p99_ms,
        "errors": level.errors,
        "client_cpu_share": level.client_cpu_share,
        "models": breakdown,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--engines", default="onnxruntime,openvino")
    args = parser.parse_args()
    from tritonkit.engines import cpu_capabilities
    from tritonkit.families.base import BuildOptions

    files = photos(args.images)
    gemm = fp32_gemm_gflops()
    rates = gemm_rates()
    print(f"FP32 matrix multiply: {gemm:.0f} GFLOP/s (numpy); PyTorch: {rates}", flush=True)
    builds = []
    for engine in args.engines.split(","):
        precisions = ["fp32", "int8"] + (["bf16"] if engine == "openvino" and "BF16" in cpu_capabilities() else [])
        builds += [(engine, precision) for precision in precisions]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as folder:
        model_dir = make_vit_b32_clip(Path(folder) / "vit-b-32")
        eager = transformers_eager(model_dir, files)
        print(f"transformers eager: {eager:.1f} images/s", flush=True)
        for engine, precision in builds:
            repository = Path(folder) / f"repo-{engine}-{precision}"
            built = build(
                "clip",
                str(model_dir),
                repository,
                options=BuildOptions(engine=engine),
                precision=PrecisionOptions(precision),
            )
            ceiling = in_process_ceiling(repository, files)
            throughput, details = served(repository, files, args.duration)
            accuracy = (
                built.accuracy[built.precision_variant].graphs["image_encoder"]["min_cosine"] if built.accuracy else 1.0
            )
            rows.append(
                {
                    "engine": engine,
                    "precision": built.precision_variant,
                    "served": throughput,
                    "ceiling": ceiling,
                    "ceiling_gflops": ceiling * VIT_B32_GMACS * 2,
                    "eager": eager,
                    "min_cosine": accuracy,
                    **details,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": machine(),
        "optimization_capabilities": sorted(cpu_capabilities()),
        "fp32_gemm_gflops": gemm,
        "gemm_rates": rates,
        "images": args.images,
        "duration_s": args.duration,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result)


def _gemm_rate(result: dict, precision: str) -> float:
    """The machine's best measured matrix-multiply rate at this precision (FP32: numpy's or PyTorch's)."""
    key = _rate_key(precision)
    rates = result.get("gemm_rates", {})
    if key == "fp32":
        return max(result["fp32_gemm_gflops"], rates.get("fp32", 0.0))
    return rates.get(key, result["fp32_gemm_gflops"])


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        f"{result['images']} JPEG photos (480x640), {result['machine']['cpus']} CPUs (OpenVINO computes natively: "
        f"{', '.join(result['optimization_capabilities'])}; FP32 matrix multiply measured at "
        f"{result['fp32_gemm_gflops']:.0f} GFLOP/s with numpy; PyTorch's oneDNN on all cores: "
        + ", ".join(f"{k.upper()} {v:.0f}" for k, v in result.get("gemm_rates", {}).items())
        + f" GFLOP/s); served: `tritonkit bench` at concurrency {CONCURRENCY} for "
        f"{result['duration_s']:.0f} s (load generator on the same cores). Command: "
        "`python scripts/bench_clip.py --markdown docs/BENCHMARKS.md`. The ceiling's GFLOP/s counts "
        f"{VIT_B32_GMACS} GMACs per image.",
        "",
    ]
    lines += markdown_table(
        [
            "engine",
            "precision",
            "served images/s",
            "in-process ceiling",
            "transformers eager",
            "served / eager",
            "served / ceiling",
            "ceiling GFLOP/s (share of the precision's GEMM rate)",
            "p99 ms",
            "min cosine to FP32",
        ],
        [
            [
                r["engine"],
                r["precision"],
                f"{r['served']:.1f}",
                f"{r['ceiling']:.1f}",
                f"{r['eager']:.1f}",
                f"**{r['served'] / r['eager']:.2f}x**",
                f"**{r['served'] / r['ceiling']:.2f}x**",
                f"{r['ceiling_gflops']:.0f} ({r['ceiling_gflops'] / _gemm_rate(result, r['precision']):.0%})",
                f"{r['p99_ms']:.0f}",
                f"{r['min_cosine']:.4f}",
            ]
            for r in result["rows"]
        ],
        align_right_from=1,
    )
    lines += ["", "Server time per request at concurrency 16 (ms; queue / compute infer) and executed batch sizes:", ""]
    for r in result["rows"]:
        parts = [
            f"{name} {m['queue_ms']:.1f} / {m['infer_ms']:.1f} ({' '.join(f'{b}x{n}' for b, n in m['batch_sizes'].items())})"
            for name, m in r["models"].items()
            if name != "clip_image"
        ]
        lines.append(
            f"- {r['engine']} {r['precision']}: "
            + "; ".join(parts)
            + f"; client CPU {r['client_cpu_share']:.0%} of the machine"
        )
    replace_section(path, "bench_clip", "CLIP image embeddings (served vs baselines)", lines)


if __name__ == "__main__":
    main()
