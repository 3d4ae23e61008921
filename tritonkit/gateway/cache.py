"""A Redis cache of embeddings shared by gateway replicas (`tritonkit openai --cache-url`).

Keys hash the ensemble and the input's bytes; values are the ensemble's raw float32 vector.
Redis being down never fails a request: the gateway answers uncached and counts the errors."""

import hashlib
import logging
import time

import numpy as np

LOGGER = logging.getLogger("tritonkit.gateway")
KEY_PREFIX = "tritonkit:embedding:"


def cache_key(ensemble: str, data: bytes) -> str:
    return KEY_PREFIX + hashlib.sha256(ensemble.encode() + b"\0" + data).hexdigest()


class EmbeddingCache:
    def __init__(self, url: str, ttl_s: int, hits, misses, errors):
        import redis.asyncio as redis

        self.client = redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.ttl_s = ttl_s
        self.hits, self.misses, self.errors = hits, misses, errors
        self._warned_at = 0.0

    def _failed(self, exc: Exception) -> None:
        self.errors.inc()
        if time.monotonic() - self._warned_at > 60:  # once a minute, not once a request
            LOGGER.warning("embedding cache unavailable, answering uncached: %s", exc)
            self._warned_at = time.monotonic()

    async def get(self, ensemble: str, data: bytes) -> np.ndarray | None:
        try:
            value = await self.client.get(cache_key(ensemble, data))
        except Exception as exc:
            self._failed(exc)
            return None
        if not isinstance(value, bytes):  # None: not cached (the client returns bytes, not decoded text)
            self.misses.inc()
            return None
        self.hits.inc()
        return np.frombuffer(value, dtype="<f4").copy()

    async def put(self, ensemble: str, data: bytes, vector: np.ndarray) -> None:
        try:
            await self.client.set(cache_key(ensemble, data), np.asarray(vector, dtype="<f4").tobytes(), ex=self.ttl_s)
        except Exception as exc:
            self._failed(exc)

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:
            pass
