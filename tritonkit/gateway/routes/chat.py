"""POST /v1/chat/completions: OpenAI's messages through a chat build's ensembles, whole or
streamed, one decoder row per choice (`n`), images from data or fetched URLs."""

import asyncio
import json
import time
import uuid
from collections.abc import Mapping

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tritonkit import contracts as c
from tritonkit.client import choice_inputs, choice_rows
from tritonkit.gateway.context import Gateway, gateway_of
from tritonkit.gateway.triton import ApiError, ServedModel
from tritonkit.gateway.wire import anext_or_none, byte_row, first_text, server_sent_event

router = APIRouter()
MAX_CHOICES = 4  # a request's `n`: each choice is a row of the decoder


async def conversation(
    gateway: Gateway, messages: object, several: bool, text_only: bool
) -> tuple[list[dict], list[bytes]]:
    """OpenAI's messages as the decoder's MESSAGES (each image part as {"type": "image"}) and the
    images' bytes in order: none (with `text_only`, a model that takes turns without images),
    exactly one, or with `several` (models that take IMAGES) one or more."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: a non-empty list", param="messages")
    rendered: list[dict] = []
    images: list[bytes] = []
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
        kept = [
            await content_part(gateway, part, role, f"messages[{k}].content[{j}]", images)
            for j, part in enumerate(parts)
        ]
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


async def content_part(gateway: Gateway, part: object, role: str, param: str, images: list[bytes]) -> dict:
    """One part of a message as the decoder renders it; an image's bytes are appended to `images`."""
    kind = part.get("type") if isinstance(part, dict) else None
    if isinstance(part, dict) and kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if isinstance(part, dict) and kind == "image_url" and role == "user":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if not isinstance(url, str):
            raise ApiError(400, f"{param}.image_url.url: required", param="messages")
        images.append(await gateway.image_bytes(url, f"{param}.image_url.url"))
        return {"type": "image"}
    raise ApiError(400, f"{param}: a text part (or, in a user message, an image_url part)", param="messages")


def option_inputs(body: dict) -> dict[str, np.ndarray]:
    """The decoder's optional inputs from the request's fields (types and ranges were checked
    against OpenAI's request schema)."""
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, "stop: a string or a list of strings", param="stop")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and not body.get("logprobs"):
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    response_format = body.get("response_format")
    chosen = {
        c.MAX_NEW_TOKENS: body.get("max_completion_tokens", body.get("max_tokens")),
        c.TEMPERATURE: body.get("temperature"),
        c.TOP_P: body.get("top_p"),
        c.SEED: body.get("seed"),
        c.STOP: stops,
        c.TOP_LOGPROBS: (top_logprobs or 0) if body.get("logprobs") else None,
        c.RESPONSE_FORMAT: response_format if response_format and response_format.get("type") != "text" else None,
    }
    return {name: c.request_row(name, value) for name, value in chosen.items() if value is not None}


async def chat_inputs(gateway: Gateway, body: dict, model: ServedModel) -> tuple[dict[str, np.ndarray], bool]:
    """The chat ensemble's inputs for the request, and whether it is a turn without images
    (answered by the NAME_chat_text ensembles)."""
    if not 1 <= (body.get("n") or 1) <= MAX_CHOICES:
        raise ApiError(400, f"n: 1 to {MAX_CHOICES} choices", param="n")
    several = c.IMAGES in model.inputs
    rendered, images = await conversation(gateway, body.get("messages"), several, "text" in model.ensembles)
    inputs: dict[str, np.ndarray] = {}
    if images and several:
        inputs[c.IMAGES] = c.request_row(c.IMAGES, images)
    elif images:
        inputs[c.IMAGE] = byte_row(images[0])
    inputs[c.MESSAGES] = c.request_row(c.MESSAGES, json.dumps(rendered))
    return inputs | option_inputs(body), not images


def logprobs_of(outputs: Mapping[str, np.ndarray], row: int = 0) -> dict | None:
    """OpenAI's `choices[].logprobs` of a response's row (None when it was not asked for)."""
    raw = outputs[c.LOGPROBS].reshape(-1)[row] if c.LOGPROBS in outputs else b""
    return {"content": json.loads(raw), "refusal": None} if raw else None


def finish_reason_of(outputs: Mapping[str, np.ndarray] | None, row: int = 0) -> str:
    """OpenAI's `finish_reason` of a response's row."""
    if outputs is None or c.FINISH_REASON not in outputs:
        return "stop"
    return outputs[c.FINISH_REASON].reshape(-1)[row].decode() or "stop"


def token_counts(outputs: Mapping[str, np.ndarray], row: int = 0) -> tuple[int, int]:
    """(prompt, completion) tokens of a response's row."""
    return int(outputs[c.PROMPT_TOKENS].reshape(-1)[0]), int(outputs[c.COMPLETION_TOKENS].reshape(-1)[row])


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Completion:
    """What every object of one answer repeats: its id, creation time and model."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def envelope(self, kind: str, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    gateway = gateway_of(request)
    body = await gateway.json_body(request, "CreateChatCompletionRequest")
    model = await gateway.triton.model(body.get("model"), "chat")
    request.state.model = model.name
    inputs, text_only = await chat_inputs(gateway, body, model)
    roles = ("text", "text_stream") if text_only else ("chat", "stream")
    completion = Completion(model.name)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await streamed_answer(gateway, model, inputs, roles, body.get("n") or 1, completion, include_usage)
    return await whole_answer(gateway, model.ensembles[roles[0]], inputs, body.get("n") or 1, completion)


async def whole_answer(gateway: Gateway, ensemble: str, inputs: dict, choices: int, completion: Completion) -> dict:
    triton = gateway.triton
    if choices == 1 or c.IMAGES in inputs:
        # Qwen-VL's image turns take one conversation per request: one request per choice
        answers = await asyncio.gather(
            *(triton.infer(ensemble, choice_inputs(inputs, k), "messages") for k in range(choices))
        )
        rows = [(outputs, 0) for outputs in answers]
    else:  # the choices as rows of one request: the decoder prefills their prompt once
        outputs = await triton.infer(ensemble, choice_rows(inputs, choices), "messages")
        rows = [(outputs, k) for k in range(choices)]
    found = [
        {
            "index": k,
            "message": {"role": "assistant", "content": first_text(outputs, row=row), "refusal": None},
            "logprobs": logprobs_of(outputs, row),
            "finish_reason": finish_reason_of(outputs, row),
        }
        for k, (outputs, row) in enumerate(rows)
    ]
    prompt = token_counts(rows[0][0])[0]
    generated = sum(token_counts(outputs, row)[1] for outputs, row in rows)
    return completion.envelope("chat.completion", found, usage=usage(prompt, generated))


async def streamed_answer(
    gateway: Gateway,
    model: ServedModel,
    inputs: dict,
    roles: tuple[str, str],
    choices: int,
    completion: Completion,
    include_usage: bool,
) -> StreamingResponse:
    whole_role, stream_role = roles
    if stream_role not in model.ensembles:
        raise ApiError(400, f"stream: {model.name} has no streaming ensemble", param="stream")
    triton = gateway.triton
    # a decoupled decoder streams one answer per request: one stream per choice
    streams = [
        triton.stream(model.ensembles[stream_role], choice_inputs(inputs, k), "messages") for k in range(choices)
    ]
    try:  # errors before the first chunk are still a 400/429/503
        firsts = list(await asyncio.gather(*(anext_or_none(stream) for stream in streams)))
    except ApiError as exc:
        # tritonclient's stream errors carry no status code: a failure Triton did not classify is
        # asked again of the whole-answer ensemble, whose error does (a bad image is a 400 there)
        if exc.status != 500 or whole_role not in model.ensembles:
            raise
        await triton.infer(model.ensembles[whole_role], inputs, "messages")
        raise
    events = chunks(streams, firsts, completion, include_usage)
    return StreamingResponse(events, media_type="text/event-stream")


async def chunks(streams: list, firsts: list, completion: Completion, include_usage: bool):
    """The chunks of the choices' streams as their pieces arrive, interleaved, then the usage and
    [DONE]; an error mid-stream is its own event, after which the stream ends."""

    def chunk(found: list[dict], **extra) -> str:
        return server_sent_event(completion.envelope("chat.completion.chunk", found, **extra))

    for k in range(len(streams)):
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
        while finished < len(streams):
            kind, k, value = await arrivals.get()
            if kind == "error":
                yield server_sent_event(value.body())
                return
            if kind == "piece":
                piece, logprobs = first_text(value), logprobs_of(value)
                if piece or (logprobs and logprobs["content"]):
                    yield chunk(
                        [{"index": k, "delta": {"content": piece}, "logprobs": logprobs, "finish_reason": None}]
                    )
                continue
            finished += 1
            yield chunk([{"index": k, "delta": {}, "logprobs": None, "finish_reason": finish_reason_of(value)}])
            if value is not None and c.PROMPT_TOKENS in value:
                prompt_tokens, generated = token_counts(value)  # the same prompt for every choice
                completion_tokens += generated
    finally:
        for task in pumps:
            task.cancel()
    if include_usage and prompt_tokens:  # OpenAI: a last chunk, no choices
        yield chunk([], usage=usage(prompt_tokens, completion_tokens))
    yield "data: [DONE]\n\n"
