"""What every route of one gateway app shares: its options, the gRPC channel to Triton, the
embedding cache, its Prometheus metrics, and the request checks that come before any model."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import HTTPConnection

from tritonkit.gateway import openapi
from tritonkit.gateway.fetch import FetchPolicy, fetch
from tritonkit.gateway.realtime import RealtimeLimits
from tritonkit.gateway.triton import ApiError, Triton
from tritonkit.termination import DRAIN_S, GATEWAY_GRACE_S

if TYPE_CHECKING:
    from tritonkit.gateway.cache import EmbeddingCache

DEFAULT_MAX_BODY_MB = 100  # as the Ingress's proxy-body-size
# Request fields beyond OpenAI's schemas that the gateway takes (the schema refuses unknown fields
# of an embedding request): which input an embedding request's strings are, and raw vectors.
AUDIO_EXTENSIONS = frozenset({"beam_size", "seed", "vad_filter"})  # faster-whisper's and speaches' fields
EXTENSIONS = {
    "CreateEmbeddingRequest": frozenset({"modality", "normalize"}),
    "CreateTranscriptionRequest": AUDIO_EXTENSIONS,
    "CreateTranslationRequest": AUDIO_EXTENSIONS,
}


@dataclass(frozen=True)
class GatewayOptions:
    triton_url: str = "127.0.0.1:8001"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 1024 * 1024
    cache_url: str | None = None  # redis://host:port/db: embeddings shared by replicas
    cache_ttl_s: int = 3600
    fetch: FetchPolicy = field(default_factory=FetchPolicy)  # remote image URLs: off unless --allow-url-fetch
    realtime_limits: RealtimeLimits = field(default_factory=RealtimeLimits)  # live transcription sessions
    # on SIGTERM: /health answers 503 this long while requests are still served, then accepted
    # requests get this long to finish (tritonkit.termination)
    drain_s: float = DRAIN_S
    grace_s: float = GATEWAY_GRACE_S


class GatewayMetrics:
    """The gateway's own Prometheus metrics (GET /metrics), one registry per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "tritonkit_gateway_requests_total",
            "HTTP requests by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tritonkit_gateway_request_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.request_bytes = Histogram(
            "tritonkit_gateway_request_bytes",
            "HTTP request body size by endpoint",
            ["endpoint"],
            buckets=[1e3, 1e4, 1e5, 1e6, 1e7, 1e8],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "tritonkit_gateway_embedding_cache_hits_total", "Embeddings answered from Redis", registry=self.registry
        )
        self.cache_misses = Counter(
            "tritonkit_gateway_embedding_cache_misses_total", "Embeddings not in Redis", registry=self.registry
        )
        self.cache_errors = Counter(
            "tritonkit_gateway_embedding_cache_errors_total",
            "Redis calls that failed (answered uncached)",
            registry=self.registry,
        )
        self.cut_at_shutdown = Counter(
            "tritonkit_gateway_requests_cut_at_shutdown_total",
            "Requests still running when the shutdown's grace period ended (answered 503 shutting_down)",
            registry=self.registry,
        )


class Gateway:
    """One app's shared state; routes reach it with `gateway_of(request)`."""

    def __init__(self, options: GatewayOptions):
        self.options = options
        self.metrics = GatewayMetrics()
        self._triton: Triton | None = None
        self.cache: EmbeddingCache | None = None  # with --cache-url
        self.live_sessions = 0  # open Realtime API sessions
        self.draining = False  # SIGTERM came: /health answers 503 so that the balancer takes this replica out
        self._grace_over: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def triton(self) -> Triton:
        if self._triton is None:
            raise ApiError(503, "the gateway is starting", code="unavailable")
        return self._triton

    def grace_over(self) -> asyncio.Event:
        """Set when a shutdown's grace period ends (tritonkit.gateway.draining)."""
        if self._grace_over is None:
            self._grace_over, self._loop = asyncio.Event(), asyncio.get_running_loop()
        return self._grace_over

    def end_grace(self) -> None:
        """From any thread: the requests still running are answered with an error now."""
        if self._loop is not None and self._grace_over is not None:
            self._loop.call_soon_threadsafe(self._grace_over.set)

    async def open(self) -> None:
        self.grace_over()
        self._triton = Triton(self.options.triton_url)
        if self.options.cache_url:
            from tritonkit.gateway.cache import EmbeddingCache

            m = self.metrics
            self.cache = EmbeddingCache(
                self.options.cache_url, self.options.cache_ttl_s, m.cache_hits, m.cache_misses, m.cache_errors
            )

    async def close(self) -> None:
        if self._triton is not None:
            await self._triton.close()
        if self.cache is not None:
            await self.cache.close()

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the API key (always, without --api-key)."""
        if not self.options.api_key:
            return True
        scheme, _, key = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.options.api_key.encode())

    async def json_body(self, request: Request, schema: str) -> dict:
        """The request's JSON object, checked against OpenAI's request schema `schema` (the
        gateway's own extensions, EXTENSIONS, aside)."""
        raw = await request.body()
        limit = self.options.max_body_bytes
        if len(raw) > limit:
            raise ApiError(413, f"the request body exceeds the {limit} byte limit", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        extensions = EXTENSIONS.get(schema, frozenset())
        conform(schema, {k: v for k, v in body.items() if k not in extensions})
        return body

    async def image_bytes(self, url: str, param: str) -> bytes:
        """A data URL's bytes, or an http(s) URL's body as --allow-url-fetch permits."""
        if url.startswith(("http://", "https://")):
            return await fetch(url, self.options.fetch, param)
        return data_url_bytes(url, param)


def gateway_of(connection: HTTPConnection) -> Gateway:
    return connection.app.state.gateway


def conform(schema: str, instance: object) -> None:
    """A request outside OpenAI's request schema `schema` is a 400 naming the offending field."""
    error = openapi.first_error(schema, instance)
    if error is not None:
        where = error.param or "request"
        raise ApiError(400, f"{where}: {error.message}", param=error.param, code="invalid_value")


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a `data:...;base64,` URL."""
    if url.startswith("file:"):
        raise ApiError(
            400,
            f"{param}: file URLs are never read; send a data:image/...;base64, URL",
            param=param,
            code="invalid_value",
        )
    head, _, payload = url.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64") or not payload:
        raise ApiError(400, f"{param}: not a data:...;base64, URL", param=param, code="invalid_value")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: the data URL is not valid base64", param=param, code="invalid_value") from None
