#!/usr/bin/env python
"""The demo's CLIP half: draw three images, then (--table) embed them and three captions through
the served ensembles and print their cosine similarities.

    python scripts/demo_images.py DIR [--table [--random yes|no]] [--url 127.0.0.1:8001]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMAGES = {  # file -> what it shows
    "orange.jpg": "an orange square",
    "sky.jpg": "a blue sky over green grass",
    "night.jpg": "a dark night with a white moon",
}


def draw(folder: Path) -> None:
    from PIL import Image, ImageDraw

    Image.new("RGB", (320, 240), (230, 120, 30)).save(folder / "orange.jpg")
    sky = Image.new("RGB", (320, 240), (90, 150, 230))
    ImageDraw.Draw(sky).rectangle((0, 160, 320, 240), fill=(60, 160, 60))
    sky.save(folder / "sky.jpg")
    night = Image.new("RGB", (320, 240), (10, 10, 30))
    ImageDraw.Draw(night).ellipse((200, 30, 260, 90), fill=(240, 240, 230))
    night.save(folder / "night.jpg")


def table(folder: Path, url: str, random_model: bool) -> None:
    from tritonkit.client import TritonkitClient

    with TritonkitClient(url) as client:
        images = client.embed_images([folder / name for name in IMAGES])
        texts = client.embed_texts(list(IMAGES.values()))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    similarity = images @ texts.T
    captions = list(IMAGES.values())
    width = max(len(c) for c in captions)
    print(f"  {'':<12}" + "".join(f"  caption {k + 1}" for k in range(len(captions))))
    for name, row in zip(IMAGES, similarity):
        best = int(np.argmax(row))
        cells = "".join(f"  {v:+9.3f}{'*' if k == best else ' '}" for k, v in enumerate(row))
        print(f"  {name:<12}{cells}")
    for k, caption in enumerate(captions):
        print(f"  caption {k + 1}: {caption:<{width}}")
    print("  (* = the caption the model finds closest; cosine of the L2-normalised embeddings)")
    if random_model:
        print(
            "  This demo's CLIP has random weights (no model hub here): the table shows the served\n"
            "  pipeline works end to end, not what CLIP understands. With a real checkpoint each\n"
            "  image picks its own caption: bash scripts/demo.sh openai/clip-vit-base-patch32"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--random", choices=("yes", "no"), default="yes")
    parser.add_argument("--url", default="127.0.0.1:8001")
    args = parser.parse_args()
    if args.table:
        table(args.folder, args.url, args.random == "yes")
    else:
        draw(args.folder)


if __name__ == "__main__":
    main()
