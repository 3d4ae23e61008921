"""What the tiny models of several families share (each family's `make_tiny` is in its own module).

Nothing can be downloaded from a model hub here, so tests and the demo build their models from
configs with real tokenizers: CLIP's BPE from the open_clip_torch wheel, GPT-2's BPE from the
bundled Whisper tiny.en (LLaVA's and Qwen-VL's tiny language models).
"""

from __future__ import annotations

from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
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


def gpt2_bpe():
    """GPT-2's byte-level BPE (a `tokenizers.Tokenizer`), from the bundled Whisper tiny.en."""
    from tokenizers import Tokenizer

    from tritonkit.convert_ct2 import bundled_tiny_en

    return Tokenizer.from_file(str(Path(bundled_tiny_en()) / "tokenizer.json"))
