"""POST /v1/embeddings: texts and images (data or fetched URLs) through an embeddings build's
ensembles, each item one request so that Triton's dynamic batcher merges them, Redis in front."""

import asyncio
import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from tritonkit import contracts as c
from tritonkit.gateway.context import Gateway, gateway_of
from tritonkit.gateway.triton import ApiError, ServedModel
from tritonkit.gateway.wire import byte_row, string_array

router = APIRouter()


def normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def encoded(vector: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":  # what the openai SDK asks for and decodes (little-endian float32)
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(v) for v in vector]


def checked_items(body: dict, model: ServedModel) -> list[str]:
    """The request's inputs, after the checks of the fields the gateway reads besides them."""
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
    if body.get("modality") not in (None, *MODALITIES):
        raise ApiError(400, f"modality: {', '.join(MODALITIES)}", param="modality")
    if not isinstance(body.get("normalize", True), bool):
        raise ApiError(400, "normalize: true or false", param="normalize")
    return items


# Inputs sent as files (data URLs): the role of the model's ensemble -> its input and output tensors
MEDIA = {"image": (c.IMAGE, c.IMAGE_EMBEDS), "audio": (c.AUDIO, c.AUDIO_EMBEDS)}
MODALITIES = ("text", *MEDIA)


def modality_of(item: str, modality: str | None) -> str:
    """What an input is: as `modality` says, else a data URL's media type (data:image/...,
    data:audio/...), else text."""
    if modality is not None:
        return modality
    return next((kind for kind in MEDIA if item.startswith(f"data:{kind}/")), "text")


async def embedding(gateway: Gateway, model: ServedModel, index: int, item: str, modality: str | None) -> np.ndarray:
    """One item's vector, from the cache or its ensemble."""
    param = f"input[{index}]"
    kind = modality_of(item, modality)
    if kind in MEDIA:
        if kind not in model.ensembles:
            raise ApiError(400, f"{param}: {model.name} embeds no {kind}", param=param)
        tensor, output = MEDIA[kind]
        ensemble = model.ensembles[kind]
        data = await gateway.image_bytes(item, param)
        inputs = {tensor: byte_row(data)}
    else:
        if "text" not in model.ensembles:
            raise ApiError(400, f"{param}: {model.name} embeds no text", param=param)
        ensemble, output = model.ensembles["text"], c.TEXT_EMBEDS
        data = item.encode()
        inputs = {c.TEXT: c.request_row(c.TEXT, item)}
    cache = gateway.cache
    if cache is not None and (hit := await cache.get(ensemble, data)) is not None:
        return hit
    vector = (await gateway.triton.infer(ensemble, inputs, param))[output][0]
    if cache is not None:
        await cache.put(ensemble, data, vector)
    return vector


async def text_tokens(gateway: Gateway, model: ServedModel, texts: list[str]) -> int:
    """Tokens of the texts as the served tokenizer counts them (padding excluded)."""
    if not texts or model.tokenizer is None:
        return 0
    outputs = await gateway.triton.infer(model.tokenizer, {c.TEXT: string_array(texts)})
    if "ATTENTION_MASK" in outputs:
        return int(outputs["ATTENTION_MASK"].sum())
    ids = outputs["INPUT_IDS"]  # padded with its last id (SigLIP pads with its end token): count up to that run
    return int(sum(len(row) - int(np.argmax(row[::-1] != row[-1])) + 1 if (row != row[-1]).any() else 1 for row in ids))


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    gateway = gateway_of(request)
    body = await gateway.json_body(request, "CreateEmbeddingRequest")
    model = await gateway.triton.model(body.get("model"), "embeddings")
    request.state.model = model.name
    items = checked_items(body, model)
    modality = body.get("modality")
    vectors = await asyncio.gather(*(embedding(gateway, model, i, item, modality) for i, item in enumerate(items)))
    stacked = np.stack(vectors).astype(np.float32)
    if body.get("normalize", True):
        stacked = normalized(stacked)
    tokens = await text_tokens(gateway, model, [item for item in items if modality_of(item, modality) == "text"])
    encoding_format = body.get("encoding_format") or "float"  # float or base64, as the schema checked
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(v, encoding_format)} for i, v in enumerate(stacked)
        ],
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
