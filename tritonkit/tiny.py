"""Small random-initialised models with real architectures and real tokenizers.

Nothing can be downloaded from a model hub here, so tests and the demo build their models from
configs. The CLIP tokenizer is OpenAI's real BPE, taken from the merges file that the
open_clip_torch wheel ships (install it with `pip install --no-deps open_clip_torch`).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from tritonkit.errors import TritonkitError

CLIP_BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def clip_bpe_path() -> Path:
    import importlib.metadata

    try:
        path = Path(importlib.metadata.distribution("open_clip_torch").locate_file(CLIP_BPE_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise TritonkitError(
            "the CLIP BPE merges file is not installed", hint="pip install --no-deps open_clip_torch"
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The 49408-token OpenAI CLIP vocabulary, built the way CLIP's SimpleTokenizer builds it."""
    lines = gzip.open(clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_clip_tokenizer(directory: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    tokenizer.save_pretrained(str(directory))


def make_tiny_clip(
    directory: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    projection_dim: int = 32,
    image_size: int = 224,
    patch_size: int = 32,
    seed: int = 0,
) -> Path:
    """A random CLIPModel + real tokenizer + CLIPImageProcessor, saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 4, num_hidden_layers=layers, num_attention_heads=heads)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(common, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    CLIPModel(config).eval().save_pretrained(str(directory))
    write_clip_tokenizer(directory)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(directory))
    return directory
