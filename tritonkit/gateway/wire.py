"""Request values as the tensors a Triton request carries, and answers as server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

import numpy as np


def string_array(values: list[str]) -> np.ndarray:
    return np.array([[v.encode()] for v in values], dtype=object)


def byte_row(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)[None, :] if data else np.zeros((1, 0), dtype=np.uint8)


def server_sent_event(payload: object) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def first_text(outputs: Mapping[str, np.ndarray], name: str = "TEXT", row: int = 0) -> str:
    """A string output's text at `row` (bytes that are not UTF-8 replaced, never an error)."""
    return outputs[name].reshape(-1)[row].decode("utf-8", errors="replace")


async def anext_or_none(iterator: AsyncIterator) -> Mapping | None:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None
