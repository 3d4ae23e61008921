#!/usr/bin/env python
"""Vendor the parts of OpenAI's API description that the gateway serves.

OpenAI publishes its API as an OpenAPI document (github.com/openai/openai-openapi, MIT). The
gateway validates request bodies against its request schemas and the tests validate every response
against its response schemas; this copies those schemas, and every schema they reference, into
`tritonkit/gateway/openai_openapi.json` with the commit they came from. Rerun it to follow a newer
document:

    git clone https://github.com/openai/openai-openapi /tmp/openai-openapi
    python scripts/vendor_openai_schema.py /tmp/openai-openapi
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

TARGET = Path(__file__).resolve().parent.parent / "tritonkit" / "gateway" / "openai_openapi.json"

# The schemas of the endpoints the gateway serves (requests, answers, stream events, errors).
ROOTS = (
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateEmbeddingRequest",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "CreateTranscriptionRequest",
    "CreateTranscriptionResponseJson",
    "CreateTranscriptionResponseVerboseJson",
    "CreateTranscriptionResponseStreamEvent",
    "CreateTranslationRequest",
    "CreateTranslationResponseJson",
    "CreateTranslationResponseVerboseJson",
    "ErrorResponse",
)
PREFIX = "#/components/schemas/"


def references(node: object) -> set[str]:
    """Names of the component schemas a schema refers to, directly."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(PREFIX):
            found.add(ref[len(PREFIX) :])
        for value in node.values():
            found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def closure(schemas: dict, roots: tuple[str, ...]) -> dict:
    kept: dict = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in kept:
            continue
        kept[name] = schemas[name]
        pending.extend(references(schemas[name]) - kept.keys())
    return dict(sorted(kept.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="a clone of github.com/openai/openai-openapi")
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    document = json.loads((args.checkout / "openapi.json").read_text())
    schemas = closure(document["components"]["schemas"], ROOTS)
    vendored = {
        "x-source": {
            "repository": "https://github.com/openai/openai-openapi",
            "commit": commit,
            "file": "openapi.json",
            "license": "MIT, Copyright (c) OpenAI: openai_openapi.LICENSE",
            "openapi": document["openapi"],
            "version": document["info"]["version"],
            "roots": list(ROOTS),
        },
        "components": {"schemas": schemas},
    }
    args.out.write_text(json.dumps(vendored, indent=1, sort_keys=False) + "\n")
    print(f"{len(schemas)} schemas from openai-openapi {commit[:12]} -> {args.out}")


if __name__ == "__main__":
    main()
