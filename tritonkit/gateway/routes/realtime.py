"""WebSocket /v1/realtime: OpenAI's Realtime API transcription sessions
(the protocol in tritonkit.gateway.realtime), on a Whisper build that has a VAD model."""

import asyncio
import json

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from tritonkit import contracts as c
from tritonkit.gateway import realtime
from tritonkit.gateway.context import Gateway, gateway_of
from tritonkit.gateway.routes.audio import audio_tokens
from tritonkit.gateway.triton import ServedModel
from tritonkit.gateway.wire import byte_row, first_text

router = APIRouter()


@router.websocket("/v1/realtime")
async def realtime_endpoint(websocket: WebSocket):
    gateway = gateway_of(websocket)
    if not gateway.authorized(websocket.headers.get("authorization")):
        await websocket.close(code=1008, reason="missing or wrong API key (Authorization: Bearer KEY)")
        return
    await websocket.accept()
    sending = asyncio.Lock()

    async def send(event: dict) -> None:
        async with sending:
            await websocket.send_text(json.dumps(event))

    model = await live_model(gateway)
    refusal = why_refused(gateway, websocket, model)
    if refusal is not None:
        await send({"event_id": realtime.new_id("event"), **realtime.error_event(*refusal)})
        await websocket.close(code=1008)
        return
    assert model is not None  # refused above without one
    session = realtime.TranscriptionSession(
        realtime.SessionConfig(model.name),
        send,
        lambda wav, config: transcribe(gateway, wav, config),
        lambda samples: speech_probs(gateway, str(model.vad), samples),
        gateway.options.realtime_limits,
    )
    gateway.live_sessions += 1
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
        gateway.live_sessions -= 1
        await session.finish()


async def live_model(gateway: Gateway) -> ServedModel | None:
    """The served transcription build a session starts on: the first by name with a VAD model."""
    served = sorted(
        (m for m in (await gateway.triton.models()).values() if m.kind == "transcription" and m.vad),
        key=lambda m: m.name,
    )
    return served[0] if served else None


def why_refused(gateway: Gateway, websocket: WebSocket, model: ServedModel | None) -> tuple[str, str] | None:
    """Why a session cannot start (message, code), or None."""
    if websocket.query_params.get("intent") != "transcription":
        return "intent: this gateway serves transcription sessions (?intent=transcription)", "invalid_intent"
    if model is None:
        return "no served Whisper build has a VAD model for live transcription; rebuild one", "model_not_found"
    limit = gateway.options.realtime_limits.max_sessions
    if gateway.live_sessions >= limit:
        return f"{limit} live sessions are open, the limit; retry later", "session_limit_reached"
    return None


async def transcribe(gateway: Gateway, wav: bytes, config: realtime.SessionConfig) -> tuple[str, int, int]:
    """One committed turn's text, its output tokens and its audio tokens."""
    chosen = await gateway.triton.model(config.model, "transcription")
    inputs = {c.AUDIO: byte_row(wav)}
    if config.language:
        inputs[c.LANGUAGE] = c.request_row(c.LANGUAGE, config.language)
    if config.prompt and c.PROMPT in chosen.inputs:
        inputs[c.PROMPT] = c.request_row(c.PROMPT, config.prompt)
    outputs = await gateway.triton.infer(chosen.ensembles["speech"], inputs, "audio")
    return first_text(outputs), int((outputs[c.TOKENS] >= 0).sum()), audio_tokens(wav)


async def speech_probs(gateway: Gateway, vad_model: str, samples: np.ndarray) -> np.ndarray:
    outputs = await gateway.triton.infer(vad_model, {"VAD_SAMPLES": samples[None, :]})
    return outputs["SPEECH_PROBS"].reshape(-1)
