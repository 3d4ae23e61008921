"""Every answer the gateway tests receive, checked against OpenAI's API description.

The tests' clients (the official SDK and plain httpx) send through `ConformanceTransport`, which
hands each response on untouched and, once its body has been read, validates it against the
schema OpenAI's document gives for that endpoint, status and content type (each SSE event of a
stream on its own). Violations are collected, and conftest fails the test that received them:
a client generated from the document would have rejected that answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import openai

from tritonkit.gateway import openapi

VIOLATIONS: list[str] = []
# (method, path pattern) -> schema of a 200 JSON answer, schema of each event of a 200 stream
ENDPOINTS = {
    ("POST", r"/v1/chat/completions"): (("CreateChatCompletionResponse",), "CreateChatCompletionStreamResponse"),
    ("POST", r"/v1/embeddings"): (("CreateEmbeddingResponse",), None),
    ("GET", r"/v1/models"): (("ListModelsResponse",), None),
    ("GET", r"/v1/models/[^/]+"): (("Model",), None),
    ("POST", r"/v1/audio/transcriptions"): (
        ("CreateTranscriptionResponseJson", "CreateTranscriptionResponseVerboseJson"),
        "CreateTranscriptionResponseStreamEvent",
    ),
    ("POST", r"/v1/audio/translations"): (
        ("CreateTranslationResponseJson", "CreateTranslationResponseVerboseJson"),
        None,
    ),
}
PLAIN_TEXT_FORMATS = ("text", "srt", "vtt")  # OpenAI answers these as text/plain: no schema


def schemas_for(method: str, path: str) -> tuple[tuple[str, ...], str | None] | None:
    for (verb, pattern), schemas in ENDPOINTS.items():
        if verb == method and re.fullmatch(pattern, path):
            return schemas
    return None


def violations_of(names: tuple[str, ...], instance: object) -> list[str]:
    """The errors of `instance` against the first of `names` it conforms to (none if any does)."""
    found = []
    for name in names:
        errors = openapi.errors(name, instance)
        if not errors:
            return []
        found.append(f"{name}: " + "; ".join(f"{e.param or '(root)'}: {e.message}" for e in errors[:5]))
    return found


def check(request: httpx.Request, response: httpx.Response, body: bytes) -> None:
    path = request.url.path
    if not path.startswith("/v1/"):
        return
    where = f"{request.method} {path} -> {response.status_code}"
    content_type = response.headers.get("content-type", "")
    if response.status_code >= 400:
        try:
            payload = json.loads(body)
        except ValueError:
            VIOLATIONS.append(f"{where}: an error that is not JSON: {body[:200]!r}")
            return
        VIOLATIONS.extend(f"{where}: {v}" for v in violations_of(("ErrorResponse",), payload))
        return
    schemas = schemas_for(request.method, path)
    if schemas is None:
        VIOLATIONS.append(f"{where}: an endpoint OpenAI's document does not have")
        return
    whole, event = schemas
    if content_type.startswith("text/event-stream"):
        if event is None:
            VIOLATIONS.append(f"{where}: streamed, which OpenAI's document does not stream")
            return
        for data in sse_data(body):
            if data == "[DONE]":
                continue
            payload = json.loads(data)
            names = ("ErrorResponse",) if "error" in payload else (event,)  # an error after the first event
            VIOLATIONS.extend(f"{where} (event): {v}" for v in violations_of(names, payload))
        return
    if content_type.startswith("text/plain"):
        return  # text, srt and vtt transcriptions: a string is what the document gives
    try:
        payload = json.loads(body)
    except ValueError:
        VIOLATIONS.append(f"{where}: {content_type} that is not JSON")
        return
    if path == "/v1/embeddings" and asked_for_base64(request):
        payload = decoded_embeddings(payload, where)
    VIOLATIONS.extend(f"{where}: {v}" for v in violations_of(whole, payload))


def asked_for_base64(request: httpx.Request) -> bool:
    try:
        return json.loads(request.content).get("encoding_format") == "base64"
    except (ValueError, AttributeError):
        return False


def decoded_embeddings(payload: dict, where: str) -> dict:
    """OpenAI's document types `embedding` as an array of numbers only, while its API answers
    `encoding_format: base64` (the SDK's default) with a base64 string of little-endian float32:
    each such string must decode, and is checked as the array it stands for."""
    import base64
    import binascii

    import numpy as np

    for item in payload.get("data", []):
        if isinstance(item, dict) and isinstance(item.get("embedding"), str):
            try:
                raw = base64.b64decode(item["embedding"], validate=True)
            except binascii.Error:
                VIOLATIONS.append(f"{where}: data[{item.get('index')}].embedding is not base64")
                continue
            if len(raw) % 4:
                VIOLATIONS.append(f"{where}: data[{item.get('index')}].embedding is not float32s")
                continue
            item["embedding"] = np.frombuffer(raw, dtype="<f4").tolist()
    return payload


def sse_data(body: bytes) -> Iterator[str]:
    for event in body.decode().split("\n\n"):
        lines = [line[len("data:") :].strip() for line in event.splitlines() if line.startswith("data:")]
        if lines:
            yield "\n".join(lines)


class TeeStream(httpx.SyncByteStream):
    """The response's bytes, passed on as they come and checked once all were read."""

    def __init__(self, inner: httpx.SyncByteStream, request: httpx.Request, response: httpx.Response):
        self.inner, self.request, self.response = inner, request, response
        self.chunks: list[bytes] = []
        self.complete = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.chunks.append(chunk)
            yield chunk
        self.complete = True

    def close(self) -> None:
        self.inner.close()
        if self.complete:
            check(self.request, self.response, b"".join(self.chunks))


class ConformanceTransport(httpx.BaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=TeeStream(response.stream, request, response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


def client(**options) -> httpx.Client:
    """An httpx client whose answers are checked (tests' raw HTTP requests)."""
    return httpx.Client(transport=ConformanceTransport(), **options)


def sdk(base_url: str, api_key: str, **options) -> openai.OpenAI:
    """The official SDK over a checked transport."""
    return openai.OpenAI(base_url=base_url, api_key=api_key, http_client=client(timeout=600), **options)
