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


def unigram_tokenizer(texts: list[str], specials: list[str], vocab_size: int, lowercase: bool = False):
    """A SentencePiece-style Unigram tokenizer (a `tokenizers.Tokenizer`: NFKC, Metaspace) trained
    on `texts`, its `specials` first (ids 0, 1, ...) and "<unk>" among them; the caller sets its
    template (which specials wrap a text)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]) if lowercase else normalizers.NFKC()
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
