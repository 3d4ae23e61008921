#!/usr/bin/env python
"""Decoding speed with a JSON-schema constraint against without, at 1 and 8 rows.

The in-flight chat loop (`tritonkit.chat_loop`) on the tiny LLaVA's language model (random
weights, GPT-2's BPE: 50k tokens), one torch thread as a decoder instance on its share of the
cores. Each run generates `--tokens` tokens per row for 1 or 8 rows at once, free or constrained
by a JSON schema (`response_format` json_schema, llguidance masks), alternated side by side in
one run; the figure is generated tokens per second and the constrained/free ratio. A random model
constrained to a schema may finish its JSON early: tokens/s counts what was generated.

    python scripts/bench_structured.py [--tokens 64] [--rounds 3] [--json out.json]
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

SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 200},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["caption", "objects", "count"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from tritonkit.chat_decoding import ChatGenerator, ChatOptions, chat_prompt, response_grammar
    from tritonkit.chat_loop import ChatLoop, wait_answers
    from tritonkit.families import get_family
    from tritonkit.families.llava import language_model, make_tiny_llava

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        loaded = get_family("llava").load(str(make_tiny_llava(Path(folder) / "llava")))
    tokenizer = loaded.processor.tokenizer
    generator = ChatGenerator(
        language_model(loaded.model), tokenizer, loaded.model.config.image_token_id, [tokenizer.eos_token_id]
    )
    grammar = response_grammar(json.dumps({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}))
    ids = generator.prompt_ids(chat_prompt(loaded.processor, "Describe the picture as JSON.", 0), [])
    features = np.zeros((0, generator.lm.config.hidden_size), dtype=np.float32)
    loop = ChatLoop(generator, args.tokens, max_rows=8)
    rates: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for rows in (1, 8):
                for kind in ("free", "json_schema"):
                    jobs = [
                        {
                            "features": features,
                            "prompt_ids": ids,
                            # sampled, so the 8 rows differ (each with its own seed)
                            "options": ChatOptions(
                                max_new_tokens=args.tokens,
                                temperature=1.0,
                                seed=k,
                                grammar=grammar if kind == "json_schema" else None,
                            ),
                        }
                        for k in range(rows)
                    ]
                    began = time.perf_counter()
                    answers = []
                    for answer in wait_answers(loop, jobs, together=True):
                        if isinstance(answer, Exception):
                            raise answer
                        answers.append(answer)
                    elapsed = time.perf_counter() - began
                    tokens = sum(len(a.tokens) for a in answers)
                    if kind == "json_schema":
                        for a in answers:
                            if a.reason == "stop":
                                json.loads(a.text)  # a finished constrained answer is JSON
                    rates.setdefault(f"{kind} rows {rows}", []).append(tokens / elapsed)
    finally:
        loop.stop()
    report = {}
    for rows in (1, 8):
        free = statistics.median(rates[f"free rows {rows}"])
        constrained = statistics.median(rates[f"json_schema rows {rows}"])
        report[rows] = {
            "free_tokens_per_s": round(free, 1),
            "json_schema_tokens_per_s": round(constrained, 1),
            "ratio": round(constrained / free, 3),
        }
        print(f"rows {rows}: free {free:7.1f} tok/s, json_schema {constrained:7.1f} tok/s ({constrained / free:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
