"""The OpenAI-compatible HTTP API in front of a Triton server that serves tritonkit ensembles.

An ASGI app (FastAPI); every request becomes gRPC requests on one shared asynchronous channel, so
concurrent HTTP requests reach Triton together and its dynamic batcher merges them. Errors use
OpenAI's envelope; a request's bad input is a 400 carrying the served model's own message.
"""

import asyncio
import base64
import binascii
import hmac
import json
import math
import time
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tritonkit import subtitles
from tritonkit.client import choice_inputs, choice_rows
from tritonkit.gateway import openapi, realtime
from tritonkit.gateway.fetch import FetchPolicy, fetch
from tritonkit.gateway.realtime import RealtimeLimits
from tritonkit.gateway.triton import ApiError, ServedModel, Triton

DEFAULT_MAX_BODY_MB = 100  # as the Ingress's proxy-body-size
AUDIO_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MAX_CHOICES = 4  # a request's `n`: each choice is a row of the decoder
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


def string_array(values: list[str]) -> np.ndarray:
    return np.array([[v.encode()] for v in values], dtype=object)


def byte_row(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)[None, :] if data else np.zeros((1, 0), dtype=np.uint8)


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


def normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def encoded(vector: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":  # what the openai SDK asks for and decodes (little-endian float32)
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(v) for v in vector]


def create_app(options: GatewayOptions):
    from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    state: dict[str, Any] = {}
    registry = CollectorRegistry()
    requests_total = Counter(
        "tritonkit_gateway_requests_total",
        "HTTP requests by endpoint, model and status",
        ["endpoint", "model", "status"],
        registry=registry,
    )
    latency = Histogram(
        "tritonkit_gateway_request_seconds", "HTTP request latency by endpoint", ["endpoint"], registry=registry
    )
    request_bytes = Histogram(
        "tritonkit_gateway_request_bytes",
        "HTTP request body size by endpoint",
        ["endpoint"],
        buckets=[1e3, 1e4, 1e5, 1e6, 1e7, 1e8],
        registry=registry,
    )

    cache_hits = Counter(
        "tritonkit_gateway_embedding_cache_hits_total", "Embeddings answered from Redis", registry=registry
    )
    cache_misses = Counter(
        "tritonkit_gateway_embedding_cache_misses_total", "Embeddings not in Redis", registry=registry
    )
    cache_errors = Counter(
        "tritonkit_gateway_embedding_cache_errors_total",
        "Redis calls that failed (answered uncached)",
        registry=registry,
    )

    @asynccontextmanager
    async def lifespan(_app):
        state["triton"] = Triton(options.triton_url)
        state["cache"] = None
        if options.cache_url:
            from tritonkit.gateway.cache import EmbeddingCache

            state["cache"] = EmbeddingCache(
                options.cache_url, options.cache_ttl_s, cache_hits, cache_misses, cache_errors
            )
        yield
        await state["triton"].close()
        if state["cache"] is not None:
            await state["cache"].close()

    app = FastAPI(title="tritonkit OpenAI-compatible API", lifespan=lifespan)

    def triton() -> Triton:
        return state["triton"]

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(_request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request, exc):
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        began = time.perf_counter()
        endpoint = request.url.path
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        if length > options.max_body_bytes:
            response = error_response(
                ApiError(
                    413,
                    f"the request body ({length} bytes) exceeds the {options.max_body_bytes} byte limit (--max-body-mb)",
                    code="request_too_large",
                )
            )
        elif endpoint.startswith("/v1/") and options.api_key and not authorized(request.headers.get("authorization")):
            response = error_response(
                ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
            )
        else:
            response = await call_next(request)
        if endpoint.startswith("/v1/"):
            latency.labels(endpoint).observe(time.perf_counter() - began)
            request_bytes.labels(endpoint).observe(length)
            requests_total.labels(endpoint, getattr(request.state, "model", ""), str(response.status_code)).inc()
        return response

    def authorized(header: str | None) -> bool:
        scheme, _, key = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            key.strip().encode(), (options.api_key or "").encode()
        )

    async def json_body(request: Request, schema: str) -> dict:
        """The request's JSON object, checked against OpenAI's request schema `schema` (the
        gateway's own extensions, EXTENSIONS, aside)."""
        raw = await request.body()
        if len(raw) > options.max_body_bytes:
            raise ApiError(
                413, f"the request body exceeds the {options.max_body_bytes} byte limit", code="request_too_large"
            )
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        extensions = EXTENSIONS.get(schema, frozenset())
        conform(schema, {k: v for k, v in body.items() if k not in extensions})
        return body

    @app.get("/health")
    async def health():
        if not await triton().ready():
            raise ApiError(503, f"the inference server at {options.triton_url} is not ready", code="unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    def model_object(m) -> dict:
        return {"id": m.name, "object": "model", "created": 0, "owned_by": "tritonkit", "kind": m.kind}

    @app.get("/v1/models")
    async def models():
        served = await triton().models(refresh=True)
        return {"object": "list", "data": [model_object(m) for m in sorted(served.values(), key=lambda m: m.name)]}

    @app.get("/v1/models/{name}")
    async def retrieve_model(name: str):
        served = await triton().models(refresh=True)
        if name not in served:
            known = ", ".join(sorted(served)) or "none"
            raise ApiError(
                404, f"model {name!r} is not served (served: {known})", param="model", code="model_not_found"
            )
        return model_object(served[name])

    async def image_bytes(url: str, param: str) -> bytes:
        """A data URL's bytes, or an http(s) URL's body as --allow-url-fetch permits."""
        if url.startswith(("http://", "https://")):
            return await fetch(url, options.fetch, param)
        return data_url_bytes(url, param)

    # -- embeddings ---------------------------------------------------------------------------------
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await json_body(request, "CreateEmbeddingRequest")
        model = await triton().model(body.get("model"), "embeddings")
        request.state.model = model.name
        items = body.get("input")
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise ApiError(
                400, "input: a string or a non-empty list of strings (token arrays are not supported)", param="input"
            )
        if body.get("dimensions") is not None:
            raise ApiError(
                400, f"dimensions: {model.name} has a fixed embedding size; leave dimensions out", param="dimensions"
            )
        encoding_format = body.get("encoding_format") or "float"  # float or base64, as the schema checked
        modality = body.get("modality")
        if modality not in (None, "text", "image"):
            raise ApiError(400, "modality: text or image", param="modality")
        normalize = body.get("normalize", True)
        if not isinstance(normalize, bool):
            raise ApiError(400, "normalize: true or false", param="normalize")

        async def one(index: int, item: str) -> np.ndarray:
            param = f"input[{index}]"
            if modality == "image" or (modality is None and item.startswith("data:image/")):
                if "image" not in model.ensembles:
                    raise ApiError(400, f"{param}: {model.name} embeds no images", param=param)
                ensemble, output = model.ensembles["image"], "IMAGE_EMBEDS"
                data = await image_bytes(item, param)
                inputs = {"IMAGE": byte_row(data)}
            else:
                if "text" not in model.ensembles:
                    raise ApiError(400, f"{param}: {model.name} embeds no text", param=param)
                ensemble, output = model.ensembles["text"], "TEXT_EMBEDS"
                data = item.encode()
                inputs = {"TEXT": string_array([item])}
            cache = state["cache"]
            if cache is not None and (hit := await cache.get(ensemble, data)) is not None:
                return hit
            vector = (await triton().infer(ensemble, inputs, param))[output][0]
            if cache is not None:
                await cache.put(ensemble, data, vector)
            return vector

        texts = [
            item for item in items if not (modality == "image" or (modality is None and item.startswith("data:image/")))
        ]
        vectors = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        stacked = np.stack(vectors).astype(np.float32)
        if normalize:
            stacked = normalized(stacked)
        tokens = await text_tokens(model, texts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encoded(v, encoding_format)}
                for i, v in enumerate(stacked)
            ],
            "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def text_tokens(model: ServedModel, texts: list[str]) -> int:
        """Tokens of the texts as the served tokenizer counts them (padding excluded)."""
        if not texts or model.tokenizer is None:
            return 0
        outputs = await triton().infer(model.tokenizer, {"TEXT": string_array(texts)})
        if "ATTENTION_MASK" in outputs:
            return int(outputs["ATTENTION_MASK"].sum())
        ids = outputs["INPUT_IDS"]  # padded with its last id (SigLIP pads with its end token): count up to that run
        return int(
            sum(len(row) - int(np.argmax(row[::-1] != row[-1])) + 1 if (row != row[-1]).any() else 1 for row in ids)
        )

    # -- chat -------------------------------------------------------------------------------------
    async def conversation(messages: object, several: bool, text_only: bool) -> tuple[list[dict], list[bytes]]:
        """OpenAI's messages as the decoder's MESSAGES (each image part as {"type": "image"}) and the
        images' bytes in order: none (with `text_only`, a model that takes turns without images),
        exactly one, or with `several` (models that take IMAGES) one or more."""
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: a non-empty list", param="messages")
        rendered, images = [], []
        for k, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise ApiError(
                    400, f"messages[{k}].role: system, developer, user or assistant (no tools)", param="messages"
                )
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ApiError(400, f"messages[{k}].content: a string or a list of parts", param="messages")
            kept: list[dict] = []
            for j, part in enumerate(parts):
                param = f"messages[{k}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    kept.append({"type": "text", "text": part["text"]})
                elif kind == "image_url" and role == "user":
                    url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
                    if not isinstance(url, str):
                        raise ApiError(400, f"{param}.image_url.url: required", param="messages")
                    images.append(await image_bytes(url, f"{param}.image_url.url"))
                    kept.append({"type": "image"})
                else:
                    raise ApiError(
                        400, f"{param}: a text part (or, in a user message, an image_url part)", param="messages"
                    )
            rendered.append({"role": role, "content": kept})
        if not images and not text_only:
            raise ApiError(
                400,
                "messages: at least one image_url part is needed (this build has no text-only chat; rebuild it)",
                param="messages",
            )
        if not several and len(images) > 1:
            raise ApiError(400, f"messages: exactly one image_url part is needed, got {len(images)}", param="messages")
        return rendered, images

    async def chat_inputs(body: dict, model: ServedModel) -> tuple[dict[str, np.ndarray], bool]:
        """The chat ensemble's inputs for the request, and whether it is a turn without images
        (answered by the NAME_chat_text ensembles)."""
        if not 1 <= (body.get("n") or 1) <= MAX_CHOICES:
            raise ApiError(400, f"n: 1 to {MAX_CHOICES} choices", param="n")
        several = "IMAGES" in model.inputs
        rendered, images = await conversation(body.get("messages"), several, "text" in model.ensembles)
        if not images:
            inputs = {}
        elif several:
            inputs = {"IMAGES": np.array([images], dtype=object)}
        else:
            inputs = {"IMAGE": byte_row(images[0])}
        inputs["MESSAGES"] = string_array([json.dumps(rendered)])
        # types and ranges were checked against OpenAI's request schema (json_body)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None:
            inputs["MAX_NEW_TOKENS"] = np.array([[limit]], dtype=np.int32)
        for key, tensor, dtype in (
            ("temperature", "TEMPERATURE", np.float32),
            ("top_p", "TOP_P", np.float32),
            ("seed", "SEED", np.int64),
        ):
            if body.get(key) is not None:
                inputs[tensor] = np.array([[body[key]]], dtype=dtype)
        stop = body.get("stop")
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise ApiError(400, "stop: a string or a list of strings", param="stop")
            inputs["STOP"] = np.array([[s.encode() for s in stops]], dtype=object)
        top_logprobs = body.get("top_logprobs")
        if top_logprobs is not None and not body.get("logprobs"):
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        if body.get("logprobs"):
            inputs["TOP_LOGPROBS"] = np.array([[top_logprobs or 0]], dtype=np.int32)
        response_format = body.get("response_format")
        if response_format is not None and response_format.get("type") != "text":
            inputs["RESPONSE_FORMAT"] = string_array([json.dumps(response_format)])
        return inputs, not images

    def logprobs_of(outputs: Mapping[str, np.ndarray], row: int = 0) -> dict | None:
        """OpenAI's `choices[].logprobs` of a response's row (None when it was not asked for)."""
        raw = outputs["LOGPROBS"].reshape(-1)[row] if "LOGPROBS" in outputs else b""
        return {"content": json.loads(raw), "refusal": None} if raw else None

    def finish_reason_of(outputs: Mapping[str, np.ndarray] | None, row: int = 0) -> str:
        """OpenAI's `finish_reason` of a response's row (builds from before FINISH_REASON: stop)."""
        if outputs is None or "FINISH_REASON" not in outputs:
            return "stop"
        return outputs["FINISH_REASON"].reshape(-1)[row].decode() or "stop"

    def usage_of(outputs: Mapping[str, np.ndarray]) -> dict | None:
        if "PROMPT_TOKENS" not in outputs:  # builds from before these outputs
            return None
        prompt = int(outputs["PROMPT_TOKENS"].reshape(-1)[0])
        completion = int(outputs["COMPLETION_TOKENS"].reshape(-1)[0])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request, "CreateChatCompletionRequest")
        model = await triton().model(body.get("model"), "chat")
        request.state.model = model.name
        stream_options = body.get("stream_options") or {}  # an object or null, as the schema checked
        inputs, text_only = await chat_inputs(body, model)
        whole_role, stream_role = ("text", "text_stream") if text_only else ("chat", "stream")
        choices = body.get("n") or 1
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.get("stream"):
            if stream_role not in model.ensembles:
                raise ApiError(400, f"stream: {model.name} has no streaming ensemble", param="stream")
            # a decoupled decoder streams one answer per request: one stream per choice
            streams = [
                triton().stream(model.ensembles[stream_role], choice_inputs(inputs, k), "messages")
                for k in range(choices)
            ]
            try:  # errors before the first chunk are still a 400/429/503
                firsts = list(await asyncio.gather(*(anext_or_none(stream) for stream in streams)))
            except ApiError as exc:
                # tritonclient's stream errors carry no status code: a failure Triton did not classify is
                # asked again of the whole-answer ensemble, whose error does (a bad image is a 400 there)
                if exc.status != 500 or whole_role not in model.ensembles:
                    raise
                await triton().infer(model.ensembles[whole_role], inputs, "messages")
                raise

            def chunk(found: list[dict], **extra) -> str:
                payload = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model.name,
                    "choices": found,
                    **extra,
                }
                return f"data: {json.dumps(payload)}\n\n"

            async def events():
                for k in range(choices):
                    role = {"role": "assistant", "content": ""}
                    yield chunk([{"index": k, "delta": role, "logprobs": None, "finish_reason": None}])
                arrivals: asyncio.Queue = asyncio.Queue()

                async def pump(k: int, stream, first) -> None:
                    outputs, last = first, first
                    try:
                        while outputs is not None:
                            last = outputs
                            await arrivals.put(("piece", k, outputs))
                            outputs = await anext_or_none(stream)
                        await arrivals.put(("done", k, last))
                    except ApiError as exc:
                        await arrivals.put(("error", k, exc))

                pumps = [asyncio.create_task(pump(k, st, first)) for k, (st, first) in enumerate(zip(streams, firsts))]
                finished, prompt_tokens, completion_tokens = 0, 0, 0
                try:
                    while finished < choices:
                        kind, k, value = await arrivals.get()
                        if kind == "error":
                            yield f"data: {json.dumps(value.body())}\n\n"
                            return
                        if kind == "piece":
                            piece = value["TEXT"].reshape(-1)[0].decode("utf-8", errors="replace")
                            logprobs = logprobs_of(value)
                            if piece or (logprobs and logprobs["content"]):
                                delta = {"content": piece}
                                yield chunk([{"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
                            continue
                        finished += 1
                        reason = finish_reason_of(value)
                        yield chunk([{"index": k, "delta": {}, "logprobs": None, "finish_reason": reason}])
                        if value is not None and (usage := usage_of(value)) is not None:
                            prompt_tokens = usage["prompt_tokens"]  # the same prompt for every choice
                            completion_tokens += usage["completion_tokens"]
                finally:
                    for task in pumps:
                        task.cancel()
                if stream_options.get("include_usage") and prompt_tokens:  # OpenAI: a last chunk, no choices
                    total = prompt_tokens + completion_tokens
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": total,
                    }
                    yield chunk([], usage=usage)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        ensemble = model.ensembles[whole_role]
        if choices == 1 or "IMAGES" in inputs:
            # Qwen-VL's image turns take one conversation per request: one request per choice
            answers = await asyncio.gather(
                *(triton().infer(ensemble, choice_inputs(inputs, k), "messages") for k in range(choices))
            )
            rows = [(outputs, 0) for outputs in answers]
        else:  # the choices as rows of one request: the decoder prefills their prompt once
            outputs = await triton().infer(ensemble, choice_rows(inputs, choices), "messages")
            rows = [(outputs, k) for k in range(choices)]
        found = [
            {
                "index": k,
                "message": {
                    "role": "assistant",
                    "content": outputs["TEXT"].reshape(-1)[row].decode("utf-8", errors="replace"),
                    "refusal": None,
                },
                "logprobs": logprobs_of(outputs, row),
                "finish_reason": finish_reason_of(outputs, row),
            }
            for k, (outputs, row) in enumerate(rows)
        ]
        answer: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model.name,
            "choices": found,
        }
        prompt = int(rows[0][0]["PROMPT_TOKENS"].reshape(-1)[0])
        completion = sum(int(outputs["COMPLETION_TOKENS"].reshape(-1)[row]) for outputs, row in rows)
        answer["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        return answer

    # -- audio ------------------------------------------------------------------------------------
    async def audio(request: Request, task: str):
        form = await request.form()
        schema = "CreateTranscriptionRequest" if task == "transcribe" else "CreateTranslationRequest"
        extensions = EXTENSIONS[schema]
        fields = [(key, value) for key, value in form.multi_items() if key.removesuffix("[]") not in extensions]
        conform(schema, openapi.form_instance(schema, fields))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "file: required, the audio file (multipart/form-data)", param="file")
        data = await upload.read()
        model = await triton().model(form.get("model"), "transcription")
        request.state.model = model.name
        streamed = str(form.get("stream") or "").lower() in ("true", "1")
        if streamed and task != "transcribe":
            raise ApiError(400, "stream: translations are answered whole; leave stream out", param="stream")
        response_format = str(form.get("response_format") or "json")
        if response_format not in AUDIO_FORMATS:
            raise ApiError(400, f"response_format: one of {', '.join(AUDIO_FORMATS)}", param="response_format")
        granularities = [
            str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
        ]
        unknown = sorted(set(granularities) - {"segment", "word"})
        if unknown:
            raise ApiError(
                400, f"timestamp_granularities: segment or word, got {unknown[0]!r}", param="timestamp_granularities"
            )
        words_asked = "word" in granularities
        if granularities and response_format != "verbose_json":  # as OpenAI answers
            raise ApiError(
                400, "timestamp_granularities: needs response_format verbose_json", param="timestamp_granularities"
            )
        timed = response_format in ("srt", "vtt", "verbose_json")
        inputs = {"AUDIO": byte_row(data), "TASK": string_array([task])}
        language = form.get("language")
        if isinstance(language, str) and language:
            inputs["LANGUAGE"] = string_array([language])

        def form_option(field: str, tensor: str, convert, dtype, expected: str) -> None:
            """A form field as the tensor the model takes (convert -> None: leave it out)."""
            raw = form.get(field)
            if not isinstance(raw, str) or not raw.strip():
                return
            try:
                value = convert(raw)
            except ValueError:
                raise ApiError(400, f"{field}: {expected}", param=field) from None
            if value is None:
                return
            inputs[tensor] = np.array([[value]], dtype=dtype)

        def flag(raw: str) -> bool | None:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return True if raw.lower() in ("true", "1") else None

        form_option("prompt", "PROMPT", str.encode, object, "text")
        raw_temperature = form.get("temperature")
        try:
            temperature = float(raw_temperature) if isinstance(raw_temperature, str) and raw_temperature else 0.0
        except ValueError:
            raise ApiError(400, "temperature: a number between 0 and 1", param="temperature") from None
        # OpenAI: 0 raises the temperature as its thresholds ask; above 0 samples
        inputs["TEMPERATURE"] = np.array([[temperature]], dtype=np.float32)
        inputs["FALLBACK"] = np.array([[temperature == 0.0]], dtype=bool)
        # beyond OpenAI's audio API: a seed as chat's, faster-whisper's beam_size, speaches' vad_filter
        form_option("seed", "SEED", int, np.int64, "an integer")
        form_option("beam_size", "BEAM_SIZE", int, np.int32, "an integer from 1 to 5")
        form_option("vad_filter", "VAD_FILTER", flag, bool, "true or false")
        if timed:
            inputs["TIMESTAMPS"] = np.array([[True]], dtype=bool)
        if words_asked:
            inputs["WORD_TIMESTAMPS"] = np.array([[True]], dtype=bool)
        if streamed:
            if response_format not in ("json", "text"):
                raise ApiError(400, "stream: with response_format json or text", param="stream")
            return await transcript_events(model.ensembles["speech_stream"], inputs, audio_tokens(data))
        outputs = await triton().infer(model.ensembles["speech"], inputs, "file")
        text = outputs["TEXT"].reshape(-1)[0].decode("utf-8", errors="replace")
        if response_format == "text":
            return PlainTextResponse(text)
        if not timed:
            return {"text": text}
        found = segments_of(outputs)
        if response_format == "srt":
            return PlainTextResponse(subtitles.srt(found))  # text/plain, as OpenAI answers srt and vtt
        if response_format == "vtt":
            return PlainTextResponse(subtitles.vtt(found))
        answer = {
            "task": task,
            "language": subtitles.language_name(outputs["DECODED_LANGUAGE"].reshape(-1)[0].decode()),
            "duration": subtitles.duration(data),
            "text": text,
        }
        if words_asked:  # OpenAI's words: trimmed text, times in seconds
            answer["words"] = [
                {"word": w["word"].strip(), "start": w["start"], "end": w["end"]} for w in words_of(outputs)
            ]
        if words_asked and "segment" not in granularities:
            return answer
        return answer | {
            "segments": [
                {
                    "id": i,
                    "seek": 0,
                    "start": seg["start"],
                    "end": seg["end"],
                    "text": seg["text"],
                    "tokens": [],
                    "temperature": seg["temperature"],
                    "avg_logprob": seg["avg_logprob"],
                    "compression_ratio": seg["compression_ratio"],
                    "no_speech_prob": seg["no_speech_prob"],
                }
                for i, seg in enumerate(found)
            ],
        }

    async def transcript_events(ensemble: str, inputs: dict, input_tokens: int) -> StreamingResponse:
        """OpenAI's streamed transcription: a transcript.text.delta event as each window's text is
        final, then transcript.text.done with the whole text and the token usage (input: the
        encoder's 1,500 audio tokens a 30 s window; output: the decoded tokens)."""
        stream = triton().stream(ensemble, inputs, "file")
        first = await anext_or_none(stream)  # errors before the first event are still a 400/429/503

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            text, output_tokens, outputs = "", 0, first
            try:
                while outputs is not None:
                    piece = outputs["TEXT"].reshape(-1)[0].decode("utf-8", errors="replace")
                    output_tokens += int((outputs["TOKENS"] >= 0).sum())
                    if piece:
                        text += piece
                        yield event({"type": "transcript.text.delta", "delta": piece})
                    outputs = await anext_or_none(stream)
            except ApiError as exc:
                yield event(exc.body())
                return
            usage = realtime.token_usage(input_tokens, output_tokens)
            yield event({"type": "transcript.text.done", "text": text, "usage": usage})

        return StreamingResponse(events(), media_type="text/event-stream")

    live_sessions = 0
    realtime_limits = options.realtime_limits

    @app.websocket("/v1/realtime")
    async def realtime_endpoint(websocket: WebSocket):
        """OpenAI's Realtime API, transcription sessions (tritonkit.gateway.realtime)."""
        nonlocal live_sessions
        if options.api_key and not authorized(websocket.headers.get("authorization")):
            await websocket.close(code=1008, reason="missing or wrong API key (Authorization: Bearer KEY)")
            return
        await websocket.accept()
        sending = asyncio.Lock()

        async def send(event: dict) -> None:
            async with sending:
                await websocket.send_text(json.dumps(event))

        async def refuse(message: str, code: str) -> None:
            await send({"event_id": realtime.new_id("event"), **realtime.error_event(message, code)})
            await websocket.close(code=1008)

        if websocket.query_params.get("intent") != "transcription":
            await refuse("intent: this gateway serves transcription sessions (?intent=transcription)", "invalid_intent")
            return
        served = sorted(
            (m for m in (await triton().models()).values() if m.kind == "transcription" and m.vad),
            key=lambda m: m.name,
        )
        if not served:
            await refuse(
                "no served Whisper build has a VAD model for live transcription; rebuild one", "model_not_found"
            )
            return
        if live_sessions >= realtime_limits.max_sessions:
            await refuse(
                f"{realtime_limits.max_sessions} live sessions are open, the limit; retry later",
                "session_limit_reached",
            )
            return
        model = served[0]
        vad_model = str(model.vad)

        async def transcribe(wav: bytes, config: realtime.SessionConfig) -> tuple[str, int, int]:
            chosen = await triton().model(config.model, "transcription")
            inputs = {"AUDIO": byte_row(wav)}
            if config.language:
                inputs["LANGUAGE"] = string_array([config.language])
            if config.prompt and "PROMPT" in chosen.inputs:
                inputs["PROMPT"] = string_array([config.prompt])
            outputs = await triton().infer(chosen.ensembles["speech"], inputs, "audio")
            text = outputs["TEXT"].reshape(-1)[0].decode("utf-8", errors="replace")
            return text, int((outputs["TOKENS"] >= 0).sum()), audio_tokens(wav)

        async def speech_probs(samples: np.ndarray) -> np.ndarray:
            outputs = await triton().infer(vad_model, {"VAD_SAMPLES": samples[None, :]})
            return outputs["SPEECH_PROBS"].reshape(-1)

        session = realtime.TranscriptionSession(
            realtime.SessionConfig(model.name), send, transcribe, speech_probs, realtime_limits
        )
        live_sessions += 1
        try:
            await session.start()
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await session.handle(message.get("text") or message.get("bytes") or b"")
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            live_sessions -= 1
            await session.finish()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await audio(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await audio(request, "translate")

    return app


AUDIO_TOKENS_PER_WINDOW = 1500  # Whisper's encoder: 1,500 positions a 30 s window


def audio_tokens(data: bytes) -> int:
    """The audio tokens of a file for OpenAI's `usage`: the encoder's positions of each 30 s window."""
    return AUDIO_TOKENS_PER_WINDOW * max(1, math.ceil(subtitles.duration(data) / 30))


def words_of(outputs: Mapping[str, np.ndarray]) -> list[dict]:
    """The timed words of one transcription's outputs (padding dropped): word (with its leading
    space), start, end, probability."""
    return [
        {
            "word": raw.decode("utf-8", errors="replace"),
            "start": round(float(start), 3),
            "end": round(float(end), 3),
            "probability": round(float(probability), 4),
        }
        for (start, end), raw, probability in zip(
            outputs["WORD_TIMES"][0], outputs["WORD_TEXTS"][0], outputs["WORD_PROBS"][0]
        )
        if start >= 0
    ]


def segments_of(outputs: Mapping[str, np.ndarray]) -> list[dict]:
    """The segments of one transcription's outputs (padding rows dropped)."""
    found = []
    stats = outputs.get("SEGMENT_STATS")
    for k, ((start, end), raw) in enumerate(zip(outputs["SEGMENT_TIMES"][0], outputs["SEGMENT_TEXTS"][0])):
        if start < 0:
            continue
        figures = stats[0, k] if stats is not None else np.zeros(4)
        found.append(
            {
                "start": round(float(start), 3),
                "end": round(float(end), 3),
                "text": raw.decode("utf-8", errors="replace"),
                "avg_logprob": float(figures[0]),
                "compression_ratio": float(figures[1]),
                "no_speech_prob": float(figures[2]),
                "temperature": float(figures[3]),
            }
        )
    return found


def conform(schema: str, instance: object) -> None:
    """A request outside OpenAI's request schema `schema` is a 400 naming the offending field."""
    error = openapi.first_error(schema, instance)
    if error is not None:
        where = error.param or "request"
        raise ApiError(400, f"{where}: {error.message}", param=error.param, code="invalid_value")


async def anext_or_none(iterator) -> Mapping | None:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


def spawn_gateway(triton_url: str, *options: str, timeout_s: float = 60):
    """`tritonkit openai` in front of `triton_url` as a child process (scripts, tests): the process
    and its base URL, once /health answers."""
    import subprocess
    import sys
    import urllib.request

    from tritonkit.errors import TritonkitError
    from tritonkit.server import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tritonkit.cli", "openai", "--triton", triton_url, "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return process, base
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise TritonkitError(f"the gateway in front of {triton_url} did not become healthy") from None
            time.sleep(0.2)


def run_gateway(options: GatewayOptions, host: str = "127.0.0.1", port: int = 9000) -> None:
    import uvicorn

    uvicorn.run(create_app(options), host=host, port=port, log_level="warning")
