"""Live transcription over OpenAI's Realtime API (`/v1/realtime?intent=transcription`).

A session receives 24 kHz PCM16 audio (`input_audio_buffer.append`, base64) and cuts it into
utterances: with `server_vad` turn detection (the default) by the Silero VAD model the Whisper
build serves, as OpenAI's server VAD does (speech from the first chunk above `threshold`, with
`prefix_padding_ms` before it, to `silence_duration_ms` of silence after it); without, at each
`input_audio_buffer.commit`. Each utterance is sent to the Whisper ensemble as one WAV request, so
the utterances of every live session share the decoder's steps with each other and with file
transcriptions. Events follow the Realtime API: `session.created` / `session.updated`,
`input_audio_buffer.speech_started` / `speech_stopped` / `committed` / `cleared`,
`conversation.item.input_audio_transcription.delta` and `.completed` (or `.failed`), and `error`
for a bad client event, after which the session goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

REALTIME_RATE = 24000  # the Realtime API's audio/pcm: 24 kHz, mono, 16-bit little-endian
VAD_RATE = 16000
VAD_CHUNK_MS = 32  # Silero VAD: one probability per 512 samples at 16 kHz
VAD_EVERY_MS = 96  # how much new audio is gathered before the VAD runs again


@dataclass(frozen=True)
class RealtimeLimits:
    """What one gateway holds (README: limits)."""

    max_sessions: int = 32  # live sessions at once; one more is told so and closed
    max_session_s: float = 3600.0  # audio a session may send in all
    max_utterance_s: float = 30.0  # speech longer than one Whisper window is committed in pieces of this
    max_buffer_s: float = 60.0  # uncommitted audio without turn detection (commit it to go on)
    max_event_bytes: int = 4 * 1024 * 1024  # one client event (base64 audio of ~87 s at most)


@dataclass(frozen=True)
class TurnDetection:
    """OpenAI's server_vad settings and defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass
class SessionConfig:
    model: str
    language: str | None = None
    prompt: str | None = None
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)

    def describe(self) -> dict:
        """The session as the Realtime API's `session` object shows a transcription session."""
        turn = None
        if self.turn_detection is not None:
            turn = {"type": "server_vad", **self.turn_detection.__dict__}
        transcription: dict[str, Any] = {"model": self.model}
        if self.language:
            transcription["language"] = self.language
        if self.prompt:
            transcription["prompt"] = self.prompt
        return {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": REALTIME_RATE},
                    "transcription": transcription,
                    "turn_detection": turn,
                }
            },
        }


class EventError(Exception):
    """A client event the session refuses: an `error` event, and the session goes on."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def wav_bytes(pcm16: bytes, rate: int = REALTIME_RATE) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.frombuffer(pcm16, dtype="<i2"), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def error_event(message: str, code: str, param: str | None = None, event_id: Any = None) -> dict:
    """The Realtime API's `error` event (its own event_id added when sent); `event_id`: the
    client event it answers, when the client named one."""
    return {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
            "event_id": event_id if isinstance(event_id, str) else None,
        },
    }


def token_usage(audio_tokens: int, output_tokens: int) -> dict:
    """OpenAI's token usage of a transcription: audio tokens in, decoded tokens out."""
    return {
        "type": "tokens",
        "input_tokens": audio_tokens,
        "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": 0},
        "output_tokens": output_tokens,
        "total_tokens": audio_tokens + output_tokens,
    }


class TranscriptionSession:
    """One live session. `send(event)` writes a server event; `transcribe(wav, config)` answers
    an utterance's (text, output tokens, audio tokens); `speech_probs(samples_16k)` the VAD's
    probabilities, one per 32 ms."""

    def __init__(
        self,
        config: SessionConfig,
        send: Callable[[dict], Awaitable[None]],
        transcribe: Callable[[bytes, SessionConfig], Awaitable[tuple[str, int, int]]],
        speech_probs: Callable[[np.ndarray], Awaitable[np.ndarray]],
        limits: RealtimeLimits = RealtimeLimits(),
    ):
        self.config, self._send, self._transcribe, self._speech_probs = config, send, transcribe, speech_probs
        self.limits = limits
        self.buffer = bytearray()  # uncommitted PCM16 at 24 kHz
        self.buffer_start_ms = 0  # the session time of the buffer's first sample
        self.received_ms = 0.0
        self.speech_start_ms: int | None = None
        self.speech_item: str | None = None
        self.unchecked_ms = 0.0  # audio since the VAD last ran
        self.previous_item: str | None = None
        self.tasks: set[asyncio.Task] = set()
        self.closed = False

    # -- events in --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.send({"type": "session.created", "session": self.config.describe()})

    async def handle(self, raw: str | bytes) -> None:
        """One client event; a bad one is answered with an `error` event."""
        event_id = None
        try:
            if len(raw) > self.limits.max_event_bytes:
                raise EventError(
                    f"event of {len(raw)} bytes exceeds the {self.limits.max_event_bytes} byte limit; send less audio "
                    "per append",
                    "event_too_large",
                )
            try:
                event = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise EventError(f"the event is not JSON: {exc}", "invalid_json") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise EventError("an event is a JSON object with a string type", "invalid_event", "type")
            event_id = event.get("event_id")
            handler = self.HANDLERS.get(event["type"])
            if handler is None:
                raise EventError(
                    f"type: {event['type']!r} is not an event of a transcription session "
                    f"({', '.join(sorted(self.HANDLERS))})",
                    "invalid_event_type",
                    "type",
                )
            await handler(self, event)
        except EventError as exc:
            await self.error(str(exc), exc.code, exc.param, event_id)

    async def update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise EventError("session: an object", "invalid_value", "session")
        if session.get("type", "transcription") != "transcription":
            raise EventError(
                "session.type: this endpoint serves transcription sessions", "invalid_value", "session.type"
            )
        audio = session.get("audio", {}) or {}
        incoming = audio.get("input", {}) if isinstance(audio, dict) else {}
        if not isinstance(incoming, dict):
            raise EventError("session.audio.input: an object", "invalid_value", "session.audio.input")
        config = self.config
        audio_format = incoming.get("format")
        if audio_format is not None and (
            not isinstance(audio_format, dict)
            or audio_format.get("type") != "audio/pcm"
            or audio_format.get("rate", REALTIME_RATE) != REALTIME_RATE
        ):
            raise EventError(
                "session.audio.input.format: audio/pcm at 24000 Hz is the format served",
                "invalid_value",
                "session.audio.input.format",
            )
        transcription = incoming.get("transcription")
        if transcription is not None:
            if not isinstance(transcription, dict):
                raise EventError("session.audio.input.transcription: an object", "invalid_value")
            model = transcription.get("model", config.model)
            if model != config.model:
                raise EventError(
                    f"session.audio.input.transcription.model: {model!r} is not served here (use {config.model!r})",
                    "invalid_value",
                    "session.audio.input.transcription.model",
                )
            config = replace(config, language=transcription.get("language"), prompt=transcription.get("prompt"))
        if "turn_detection" in incoming:
            config = replace(config, turn_detection=self.turn_detection(incoming["turn_detection"]))
        self.config = config
        updated = "transcription_session.updated" if event["type"].startswith("transcription_") else "session.updated"
        await self.send({"type": updated, "session": config.describe()})

    @staticmethod
    def turn_detection(value: Any) -> TurnDetection | None:
        if value is None:
            return None
        if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
            raise EventError(
                "session.audio.input.turn_detection: server_vad or null",
                "invalid_value",
                "session.audio.input.turn_detection",
            )
        turn = TurnDetection()
        try:
            turn = TurnDetection(
                float(value.get("threshold", turn.threshold)),
                int(value.get("prefix_padding_ms", turn.prefix_padding_ms)),
                int(value.get("silence_duration_ms", turn.silence_duration_ms)),
            )
        except (TypeError, ValueError):
            raise EventError(
                "session.audio.input.turn_detection: threshold a number, the durations integers",
                "invalid_value",
                "session.audio.input.turn_detection",
            ) from None
        if not 0 < turn.threshold < 1 or turn.prefix_padding_ms < 0 or not 0 < turn.silence_duration_ms <= 10000:
            raise EventError(
                "session.audio.input.turn_detection: threshold in (0, 1), prefix_padding_ms >= 0, "
                "silence_duration_ms in (0, 10000]",
                "invalid_value",
                "session.audio.input.turn_detection",
            )
        return turn

    async def append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise EventError("audio: base64 of 24 kHz PCM16 audio", "invalid_value", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("audio: not valid base64", "invalid_value", "audio") from None
        if len(pcm) % 2:
            raise EventError("audio: PCM16 has an even number of bytes", "invalid_value", "audio")
        added_ms = len(pcm) / 2 / REALTIME_RATE * 1000
        if self.received_ms + added_ms > self.limits.max_session_s * 1000:
            raise EventError(
                f"the session's audio would pass its {self.limits.max_session_s:g} s limit; open a new session",
                "session_expired",
            )
        if self.config.turn_detection is None and (len(self.buffer) + len(pcm)) / 2 / REALTIME_RATE > (
            self.limits.max_buffer_s
        ):
            raise EventError(
                f"input_audio_buffer: more than {self.limits.max_buffer_s:g} s uncommitted; commit it first",
                "input_audio_buffer_full",
                "audio",
            )
        self.buffer += pcm
        self.received_ms += added_ms
        self.unchecked_ms += added_ms
        if self.config.turn_detection is not None and self.unchecked_ms >= VAD_EVERY_MS:
            self.unchecked_ms = 0.0
            await self.detect()

    async def commit(self, event: dict) -> None:
        if not self.buffer:
            raise EventError("input_audio_buffer: nothing to commit", "input_audio_buffer_commit_empty")
        end_ms = self.buffer_start_ms + self.buffered_ms
        start_ms = self.speech_start_ms if self.speech_start_ms is not None else self.buffer_start_ms
        await self.committed(self.speech_item or new_id("item"), start_ms, end_ms)

    async def clear(self, event: dict) -> None:
        self.buffer_start_ms += self.buffered_ms
        self.buffer = bytearray()
        self.speech_start_ms, self.speech_item = None, None
        await self.send({"type": "input_audio_buffer.cleared"})

    HANDLERS: ClassVar[dict[str, Callable[[TranscriptionSession, dict], Awaitable[None]]]] = {
        "session.update": update,
        "transcription_session.update": update,
        "input_audio_buffer.append": append,
        "input_audio_buffer.commit": commit,
        "input_audio_buffer.clear": clear,
    }

    # -- server VAD -------------------------------------------------------------------------
    @property
    def buffered_ms(self) -> int:
        return int(len(self.buffer) / 2 * 1000 / REALTIME_RATE)

    async def detect(self) -> None:
        """Run the VAD over the buffer and act on what it finds: speech started, speech stopped
        (then the utterance is committed), or silence (then the buffer keeps only the padding)."""
        import soxr

        turn = self.config.turn_detection
        assert turn is not None
        samples = np.frombuffer(bytes(self.buffer), dtype="<i2").astype(np.float32) / 32768
        probs = await self._speech_probs(soxr.resample(samples, REALTIME_RATE, VAD_RATE).astype(np.float32))
        speech = probs >= turn.threshold
        quiet = probs < max(turn.threshold - 0.15, 0.01)
        if self.speech_start_ms is None:
            found = np.flatnonzero(speech)
            if not len(found):  # silence: keep what prefix padding may need
                keep_ms = turn.prefix_padding_ms + VAD_CHUNK_MS
                drop = max(0, self.buffered_ms - keep_ms)
                self.drop(drop)
                return
            start = self.buffer_start_ms + int(found[0]) * VAD_CHUNK_MS
            self.speech_start_ms = max(self.buffer_start_ms, start - turn.prefix_padding_ms)
            self.speech_item = new_id("item")
            await self.send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": self.speech_start_ms,
                    "item_id": self.speech_item,
                }
            )
        assert self.speech_item is not None
        offset = (self.speech_start_ms - self.buffer_start_ms) // VAD_CHUNK_MS
        last_speech = offset + int(np.flatnonzero(speech[offset:])[-1]) if speech[offset:].any() else offset
        silent_chunks = 0
        for value in quiet[last_speech + 1 :]:
            silent_chunks = silent_chunks + 1 if value else 0
        silence_ms = silent_chunks * VAD_CHUNK_MS
        end_ms = self.buffer_start_ms + (last_speech + 1) * VAD_CHUNK_MS
        too_long = self.buffer_start_ms + self.buffered_ms - self.speech_start_ms >= self.limits.max_utterance_s * 1000
        if silence_ms >= turn.silence_duration_ms or too_long:
            if too_long and silence_ms < turn.silence_duration_ms:
                end_ms = self.buffer_start_ms + self.buffered_ms
            await self.send(
                {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": self.speech_item}
            )
            await self.committed(self.speech_item, self.speech_start_ms, end_ms)

    def drop(self, milliseconds: int) -> None:
        """Forget the buffer's first `milliseconds` (on whole samples)."""
        samples = int(milliseconds * REALTIME_RATE / 1000)
        del self.buffer[: 2 * samples]
        self.buffer_start_ms += milliseconds

    # -- transcribing -----------------------------------------------------------------------
    async def committed(self, item: str, start_ms: int, end_ms: int) -> None:
        """The utterance [start_ms, end_ms) of the session's audio is committed and transcribed;
        the buffer keeps what follows it."""
        first = int((start_ms - self.buffer_start_ms) * REALTIME_RATE / 1000)
        last = int((end_ms - self.buffer_start_ms) * REALTIME_RATE / 1000)
        pcm = bytes(self.buffer[2 * max(0, first) : 2 * last])
        self.drop(end_ms - self.buffer_start_ms)
        self.speech_start_ms, self.speech_item = None, None
        await self.send(
            {"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": self.previous_item}
        )
        self.previous_item = item
        task = asyncio.create_task(self.transcribed(item, pcm))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def transcribed(self, item: str, pcm: bytes) -> None:
        try:
            text, output_tokens, audio_tokens = await self._transcribe(wav_bytes(pcm), self.config)
        except Exception as exc:  # the utterance fails alone; the session goes on
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.failed",
                    "item_id": item,
                    "content_index": 0,
                    "error": {"type": "transcription_error", "code": getattr(exc, "code", None), "message": str(exc)},
                }
            )
            return
        if text:
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.delta",
                    "item_id": item,
                    "content_index": 0,
                    "delta": text,
                }
            )
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item,
                "content_index": 0,
                "transcript": text,
                "usage": token_usage(audio_tokens, output_tokens),
            }
        )

    async def finish(self) -> None:
        """The client left: utterances still being transcribed are let go."""
        self.closed = True
        for task in list(self.tasks):
            task.cancel()

    # -- events out -------------------------------------------------------------------------
    async def send(self, event: dict) -> None:
        if not self.closed:
            await self._send({"event_id": new_id("event"), **event})

    async def error(self, message: str, code: str, param: str | None = None, event_id: Any = None) -> None:
        await self.send(error_event(message, code, param, event_id))
