#!/usr/bin/env python
"""Qwen-VL image preprocessing: tritonkit's DALI pipeline against the checkpoint's own processor,
side by side in one run on the same images.

Images: tritonkit's 40 built-in varied images (photos, text pages, textures, noise, flat
graphics, portraits, underexposed, thumbnails; colour and grayscale JPEG, RGBA PNG) plus 12 JPEG
photos of camera and web sizes (480x640 to 1080x1440), each at its own size, under two pixel
budgets: the tiny test model's (min 3,136, max 50,176 pixels: every photo is resized down a lot)
and Qwen2-VL-7B-Instruct's (min 3,136, max 12,845,056: sides only rounded to multiples of 28).

Parity, per budget: the patch grids (must be equal), the largest and mean pixel difference in grey
levels (normalized difference x std x 255), and the smallest cosine between the vision features of
the two sets of patches through the tiny random Qwen2-VL tower (random weights: the features'
sensitivity to pixel noise is not a trained model's). Speed: images/s of the processor (PIL, one
request's image a call, as the Python-backend stage runs it) and of DALI's CPU operators (batch 8,
1 and 2 threads), best of 3 runs.

    python scripts/bench_qwen_vl_preprocessing.py [--json out.json] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.calibration import varied_images
from tritonkit.families.qwen2vl import image_limits
from tritonkit.preprocessing.dali import DaliRunner, patches_graph, resized_image, serialize
from tritonkit.preprocessing.image import DALI_FORMATS, decode_image
from tritonkit.qwen_vl import RESIZED_SIZE, PatchRecipe
from tritonkit.reporting import best_seconds, machine, markdown_table, replace_section

BATCH = 8
BUDGETS = {"tiny model (max 50,176 px)": (3136, 50176), "Qwen2-VL-7B-Instruct (max 12,845,056 px)": (3136, 12845056)}
LIMITS = image_limits(DALI_FORMATS)


def photos(count: int = 12) -> list[tuple[str, bytes]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(480, 640), (720, 1280), (1080, 1440), (600, 800), (1024, 768), (1080, 1080)]
    files = []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC).save(
            buffer, format="JPEG", quality=90
        )
        files.append((f"photo {width}x{height}", buffer.getvalue()))
    return files


def best_rate(function, items: int) -> float:
    return items / best_seconds(function)


def dali_patches(runner: DaliRunner, recipe: PatchRecipe, files: list[bytes]) -> list[np.ndarray]:
    out = []
    for start in range(0, len(files), BATCH):
        sizes, checked = zip(*(resized_image(recipe, LIMITS, f) for f in files[start : start + BATCH]))
        out += [r[0] for r in runner.run_all({"IMAGE": list(checked), RESIZED_SIZE: list(sizes)})]
    return out


def bench_budget(loaded, files: list[bytes], min_pixels: int, max_pixels: int) -> dict:
    import torch

    processor = loaded.image_processor
    processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    recipe = dataclasses.replace(PatchRecipe.from_processor(processor), min_pixels=min_pixels, max_pixels=max_pixels)

    def reference_run():
        return [processor(images=[decode_image(f, LIMITS)], return_tensors="np") for f in files]

    reference = reference_run()
    rows: list[dict] = [{"engine": "transformers Qwen2VLImageProcessor (PIL)", "setting": "one image a call"}]
    rows[0]["per_s"] = best_rate(reference_run, len(files))
    levels = np.asarray(recipe.std, np.float32).repeat(recipe.temporal_patch_size * recipe.patch_size**2) * 255
    for threads in (1, 2):
        runner = DaliRunner(
            serialize(patches_graph(recipe, "IMAGE", RESIZED_SIZE), "cpu", BATCH, threads), BATCH, threads
        )
        ours = dali_patches(runner, recipe, files)
        grids_equal = all(
            recipe.grid(*resized_image(recipe, LIMITS, f)[0]) == tuple(r["image_grid_thw"][0].tolist())
            for f, r in zip(files, reference)
        )
        diffs = [np.abs(a - r["pixel_values"]) * levels for a, r in zip(ours, reference)]
        row = {
            "engine": "tritonkit DALI (CPU operators)",
            "setting": f"batch {BATCH}, {threads} thread{'s' if threads > 1 else ''}",
            "per_s": best_rate(lambda runner=runner: dali_patches(runner, recipe, files), len(files)),
            "grids_equal": grids_equal,
            "max_levels": float(max(d.max() for d in diffs)),
            "mean_levels": float(np.mean([d.mean() for d in diffs])),
        }
        if threads == 1:
            cosines = []
            with torch.no_grad():
                for a, r in zip(ours, reference):
                    grid = torch.from_numpy(r["image_grid_thw"])
                    x = loaded.model.model.visual(torch.from_numpy(a), grid_thw=grid).pooler_output
                    y = loaded.model.model.visual(torch.from_numpy(r["pixel_values"]), grid_thw=grid).pooler_output
                    cosines.append(float(torch.nn.functional.cosine_similarity(x, y).min()))
            row["min_feature_cosine"] = min(cosines)
        rows.append(row)
    patches = [int(np.prod(r["image_grid_thw"][0])) for r in reference]
    return {"rows": rows, "patches_per_image": [min(patches), int(np.median(patches)), max(patches)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    from tritonkit.families import get_family
    from tritonkit.families.qwen2vl import make_tiny_qwen_vl

    images = [(kind, data) for kind, data in varied_images(40)] + photos()
    files = [data for _, data in images]
    with tempfile.TemporaryDirectory() as folder:
        loaded = get_family("qwen2vl").load(str(make_tiny_qwen_vl(Path(folder) / "model", variant="qwen2_vl")))
        result = {
            "machine": machine(),
            "images": len(files),
            "budgets": {name: bench_budget(loaded, files, *budget) for name, budget in BUDGETS.items()},
        }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result)


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        f"{result['images']} images (the 40 built-in varied images: 8 kinds in colour and grayscale JPEG and RGBA "
        "PNG; 12 JPEG photos 480x640 to 1080x1440), each at its own size, "
        f"{result['machine']['cpus']} CPUs, best of 3 runs. Command: "
        "`python scripts/bench_qwen_vl_preprocessing.py --markdown docs/BENCHMARKS.md`. Differences against "
        "the checkpoint's processor on the same images, in grey levels (normalized difference x std x 255); feature "
        "cosine through the tiny random Qwen2-VL vision tower (random weights).",
        "",
    ]
    table = []
    for budget, figures in result["budgets"].items():
        low, median, high = figures["patches_per_image"]
        for row in figures["rows"]:
            parity = "(reference)"
            if "max_levels" in row:
                parity = f"{row['max_levels']:.1f} / {row['mean_levels']:.3f}"
            table.append(
                [
                    f"{budget}; {low}-{high} patches (median {median})",
                    f"{row['engine']}, {row['setting']}",
                    f"{row['per_s']:.1f}",
                    {True: "yes", False: "NO"}.get(row.get("grids_equal"), ""),
                    parity,
                    f"{row['min_feature_cosine']:.6f}" if "min_feature_cosine" in row else "",
                ]
            )
    lines += markdown_table(
        ["pixel budget", "engine", "images / s", "grids equal", "max / mean diff (levels)", "min feature cosine"],
        table,
    )
    ratios = []
    for budget, figures in result["budgets"].items():
        reference, *dali = figures["rows"]
        shares = ", ".join(f"{row['setting'].split(', ')[1]} {row['per_s'] / reference['per_s']:.2f}x" for row in dali)
        ratios.append(f"{budget.split(' (')[0]}: {shares}")
    lines += [
        "",
        "DALI / the processor's images/s: " + "; ".join(ratios) + ". On CPU, DALI's resize and the patch layout "
        "(a transpose of every pixel) cost about what Pillow's do, and images with transparency are composited and "
        "re-encoded before DALI sees them; `--preprocessing python` runs the processor itself (transformers' pixels "
        "exactly). DALI is the default because the same graph, with GPU operators (nvJPEG, GPU resize), is what a "
        "`--target gpu` repository runs.",
    ]
    replace_section(
        path, "bench_qwen_vl_preprocessing", "Qwen-VL preprocessing (DALI CPU vs the image processor)", lines
    )


if __name__ == "__main__":
    main()
