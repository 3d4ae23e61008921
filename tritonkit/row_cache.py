"""An LRU of an encoder's per-row outputs, keyed by a hash of the row's inputs.

Triton's response cache does not apply to models inside an ensemble (tritonserver 2.51: a
composing model with `response_cache` enabled never hits), and an ensemble whose other inputs
differ (a chat's prompt) cannot be cached whole. So an encoder whose rows repeat (the same image
asked about again) keeps its outputs here; hits and misses are published as metrics.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np


def row_key(feed: Mapping[str, np.ndarray], row: int) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(feed):
        value = np.ascontiguousarray(feed[name][row])
        digest.update(name.encode() + str(value.dtype).encode() + str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.digest()


class RowCache:
    def __init__(self, entries: int):
        self.entries = entries
        self._rows: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()

    def run(
        self, feed: Mapping[str, np.ndarray], compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], int]:
        """`compute` on the rows not cached (each distinct row once); all rows' outputs, and the hits."""
        rows = len(next(iter(feed.values())))
        keys = [row_key(feed, i) for i in range(rows)]
        missing: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._rows and key not in missing:
                missing[key] = i
        if missing:
            picked = list(missing.values())
            computed = compute({name: value[picked] for name, value in feed.items()})
            for j, key in enumerate(missing):
                self._rows[key] = {name: value[j] for name, value in computed.items()}
        outputs = {name: np.stack([self._rows[key][name] for key in keys]) for name in self._rows[keys[0]]}
        for key in keys:
            self._rows.move_to_end(key)
        while len(self._rows) > self.entries:
            self._rows.popitem(last=False)
        hits = sum(1 for i, key in enumerate(keys) if missing.get(key) != i)
        return outputs, hits
