#!/usr/bin/env python
"""Which grammar library computes JSON-schema token masks fastest on this CPU, batched?

Structured outputs (`response_format` `json_schema`) constrain each row of the chat decoder's step
to the tokens its grammar allows: one mask per constrained row per step, computed beside the
model's forward pass. This times, for llguidance, xgrammar and outlines-core on the tiny LLaVA's
tokenizer (GPT-2's BPE, 50k tokens): compiling the schema, then each step's masks for 1 and 8 rows
walking the tokens of a valid document (every row in a different place of it), applied to the
logits (the same code for all three: the decoder's `apply_bitmask`; the libraries' own CPU
kernels go through torch.compile), and advancing each matcher by its token. Figures are per step, medians over the document,
measured side by side in one run.

    python scripts/bench_grammar.py [--rows 1 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.chat_decoding import apply_bitmask  # the decoder's own, the same for every library

SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 80},
        "objects": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "count": {"type": "integer", "minimum": 0},
        "outdoor": {"type": "boolean"},
        "mood": {"enum": ["calm", "busy", "dark"]},
    },
    "required": ["caption", "objects", "count", "outdoor", "mood"],
    "additionalProperties": False,
}
DOCUMENT = {
    "caption": "A red boat on a calm lake under a grey sky",
    "objects": ["boat", "lake", "sky", "tree"],
    "count": 4,
    "outdoor": True,
    "mood": "calm",
}


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.llg, self.ops = llguidance, llguidance.numpy
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()
        self.vocab = vocab

    def compile(self, schema: dict):
        return self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))

    def matchers(self, grammar, rows: int):
        return [self.llg.LLMatcher(self.tokenizer, grammar) for _ in range(rows)]

    def masks(self, matchers, bitmask) -> None:
        self.ops.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask.numpy())

    def bitmask(self, rows: int):
        import torch

        return torch.from_numpy(self.ops.allocate_token_bitmask(rows, self.vocab))

    def apply(self, logits, bitmask) -> None:
        for row in range(len(logits)):
            apply_bitmask(logits[row], bitmask[row].numpy())

    def advance(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.vocab = vocab
        self.batch = xgrammar.BatchGrammarMatcher() if hasattr(xgrammar, "BatchGrammarMatcher") else None

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matchers(self, grammar, rows: int):
        return [self.xgr.GrammarMatcher(grammar) for _ in range(rows)]

    def masks(self, matchers, bitmask) -> None:
        if self.batch is not None and len(matchers) > 1:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
            return
        for i, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, i)

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def apply(self, logits, bitmask) -> None:
        for row in range(len(logits)):
            apply_bitmask(logits[row], bitmask[row].numpy())

    def advance(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int):
        import outlines_core

        self.oc = outlines_core
        self.vocab = vocab
        # outlines-core's Vocabulary takes tokens as the bytes they stand for (GPT-2's byte alphabet decoded)
        byte_decoder = bytes_of_gpt2_alphabet()
        tokens: dict[bytes, list[int]] = {}
        eos = tokenizer.eos_token_id
        for token, token_id in tokenizer.get_vocab().items():
            if token_id == eos or token_id >= vocab or token in tokenizer.all_special_tokens:
                continue
            try:
                text = bytes(byte_decoder[c] for c in token)
            except KeyError:
                continue
            tokens.setdefault(text, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, schema: dict):
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(build_regex_from_schema(json.dumps(schema)), self.vocabulary)

    def matchers(self, grammar, rows: int):
        return [self.oc.Guide(grammar) for _ in range(rows)]

    def masks(self, matchers, bitmask) -> None:
        for i, guide in enumerate(matchers):
            row = bitmask[i]
            guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def bitmask(self, rows: int):
        import torch

        return torch.zeros((rows, (self.vocab + 31) // 32), dtype=torch.int32)

    def apply(self, logits, bitmask) -> None:
        for row in range(len(logits)):
            apply_bitmask(logits[row], bitmask[row].numpy())

    def advance(self, matcher, token: int) -> None:
        matcher.advance(token)


def bytes_of_gpt2_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted (its BPE tokens spell bytes with these characters)."""
    from tritonkit.tiny import bytes_to_unicode

    return {character: byte for byte, character in bytes_to_unicode().items()}


def measure(library, tokenizer, rows: int) -> dict:
    import torch

    began = time.perf_counter()
    grammar = library.compile(SCHEMA)
    compile_s = time.perf_counter() - began
    document = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    matchers = library.matchers(grammar, rows)
    offsets = [k * len(document) // (2 * rows) for k in range(rows)]  # each row somewhere else in it
    for matcher, offset in zip(matchers, offsets):
        for token in document[:offset]:
            library.advance(matcher, token)
    bitmask = library.bitmask(rows)
    logits = torch.randn((rows, library.vocab))
    steps = len(document) - max(offsets)
    mask_s, apply_s, advance_s = [], [], []
    for step in range(steps):
        began = time.perf_counter()
        library.masks(matchers, bitmask)
        mask_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        library.apply(logits, bitmask)
        apply_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        for matcher, offset in zip(matchers, offsets):
            token = document[offset + step]
            allowed = bool(bitmask[matchers.index(matcher), token // 32] >> (token % 32) & 1)
            assert allowed, f"{library.name}: the document's token {token} was masked out"
            library.advance(matcher, token)
        advance_s.append(time.perf_counter() - began)
    return {
        "library": library.name,
        "rows": rows,
        "compile_ms": round(compile_s * 1000, 2),
        "mask_ms_per_step": round(statistics.median(mask_s) * 1000, 4),
        "apply_ms_per_step": round(statistics.median(apply_s) * 1000, 4),
        "advance_ms_per_step": round(statistics.median(advance_s) * 1000, 4),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from tritonkit.families.llava import make_tiny_llava

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        model_dir = make_tiny_llava(Path(folder) / "llava")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = len(tokenizer)
    results = []
    for make in (Llguidance, Xgrammar, OutlinesCore):
        try:
            library = make(tokenizer, vocab)
        except ImportError as exc:
            print(f"{make.name}: not installed ({exc})")
            continue
        for rows in args.rows:
            result = measure(library, tokenizer, rows)
            results.append(result)
            print(
                f"{result['library']:<14} rows {rows}: compile {result['compile_ms']:8.1f} ms, per step: masks "
                f"{result['mask_ms_per_step']:.3f} ms, apply {result['apply_ms_per_step']:.3f} ms, "
                f"advance {result['advance_ms_per_step']:.3f} ms",
                flush=True,
            )
    fastest = {}
    for rows in args.rows:
        at = [r for r in results if r["rows"] == rows]
        best = min(at, key=lambda r: r["mask_ms_per_step"] + r["apply_ms_per_step"] + r["advance_ms_per_step"])
        fastest[rows] = best["library"]
        for r in at:
            total = r["mask_ms_per_step"] + r["apply_ms_per_step"] + r["advance_ms_per_step"]
            best_total = best["mask_ms_per_step"] + best["apply_ms_per_step"] + best["advance_ms_per_step"]
            r["step_vs_fastest"] = round(total / best_total, 2)
    print("fastest per step:", fastest, "(tokenizer vocabulary", vocab, "tokens; numpy", np.__version__ + ")")
    if args.json:
        args.json.write_text(json.dumps({"vocab": vocab, "results": results, "fastest": fastest}, indent=2))


if __name__ == "__main__":
    main()
