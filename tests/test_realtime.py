"""Live transcription over OpenAI's Realtime API (`/v1/realtime?intent=transcription`): the
official `openai` SDK's realtime client and a plain WebSocket client, against `tritonkit serve`
on a real tritonserver serving Whisper tiny.en (its Silero VAD as the server VAD)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import serve_with_gateway
from tritonkit.client import TritonkitClient
from tritonkit.gateway.realtime import REALTIME_RATE, wav_bytes

pytestmark = pytest.mark.server
openai = pytest.importorskip("openai")
websockets_client = pytest.importorskip("websockets.sync.client")
KEY = "realtime-test-key"
SESSION = {
    "type": "transcription",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": REALTIME_RATE},
            "transcription": {"model": "whisper"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 1000},
        }
    },
}


@pytest.fixture(scope="module")
def live(whisper_repository):
    with serve_with_gateway(whisper_repository, KEY) as urls:
        yield urls


def pcm24k(clip: bytes) -> np.ndarray:
    """A WAV clip as the Realtime API's audio: 24 kHz PCM16."""
    import soxr

    from tritonkit.preprocessing.audio import AudioRecipe, decode_audio

    samples = soxr.resample(decode_audio(clip, AudioRecipe()), 16000, REALTIME_RATE)
    return np.clip(samples * 32768, -32768, 32767).astype("<i2")


def recording(clips: list[bytes], silence_s: float = 2.0) -> bytes:
    """The clips with silence before, between and after them (longer than a sentence's pauses)."""
    silence = np.zeros(int(silence_s * REALTIME_RATE), dtype="<i2")
    parts = [silence]
    for clip in clips:
        parts += [pcm24k(clip), silence]
    return np.concatenate(parts).tobytes()


def chunks(pcm: bytes, milliseconds: int = 100):
    step = 2 * REALTIME_RATE * milliseconds // 1000
    for start in range(0, len(pcm), step):
        yield base64.b64encode(pcm[start : start + step]).decode()


def cut(pcm: bytes, start_ms: int, end_ms: int) -> bytes:
    return pcm[2 * (start_ms * REALTIME_RATE // 1000) : 2 * (end_ms * REALTIME_RATE // 1000)]


def test_two_utterances_through_the_sdk_are_two_items_equal_to_the_ensemble(live, speech_files):
    base, grpc_url = live
    pcm = recording(speech_files[:2])
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY)
    events = []
    with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        connection.session.update(session=SESSION)
        for audio in chunks(pcm):  # faster than real time
            connection.input_audio_buffer.append(audio=audio)
        for event in connection:
            events.append(event)
            completed = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
            if len(completed) == 2 or event.type == "error":
                break
    kinds = [e.type for e in events]
    assert kinds[:2] == ["session.created", "session.updated"] and "error" not in kinds, kinds
    started = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stopped = {e.item_id: e for e in events if e.type == "input_audio_buffer.speech_stopped"}
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    assert len(started) == len(committed) == 2 and committed[1].previous_item_id == committed[0].item_id
    completed = {e.item_id: e for e in events if e.type == "conversation.item.input_audio_transcription.completed"}
    with TritonkitClient(grpc_url) as triton:
        for start in started:
            end = stopped[start.item_id].audio_end_ms
            assert start.audio_start_ms < end
            (want,) = triton.transcribe([wav_bytes(cut(pcm, start.audio_start_ms, end))])
            item = completed[start.item_id]
            assert item.transcript == want.text and item.transcript.strip()
            assert item.usage.output_tokens == len(want.tokens) and item.usage.input_tokens == 1500
    # the utterances sit where the speech is: the first ends before the second starts
    assert stopped[started[0].item_id].audio_end_ms < started[1].audio_start_ms


def plain_session(base: str):
    url = base.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    return websockets_client.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}, max_size=None)


def receive(socket, until: str, timeout: float = 120) -> list[dict]:
    events = []
    while True:
        event = json.loads(socket.recv(timeout=timeout))
        events.append(event)
        if event["type"] in (until, "error"):
            return events


def test_malformed_events_are_error_events_and_the_session_goes_on(live, speech_files):
    base, grpc_url = live
    with plain_session(base) as socket:
        assert receive(socket, "session.created")[-1]["type"] == "session.created"
        bad = [
            ("{not json", "invalid_json"),
            (json.dumps({"type": "response.create"}), "invalid_event_type"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_value"),
            (
                json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
                "invalid_value",
            ),
            (json.dumps({"type": "input_audio_buffer.commit", "event_id": "mine"}), "input_audio_buffer_commit_empty"),
            (
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
                    }
                ),
                "invalid_value",
            ),
            (json.dumps([1, 2]), "invalid_event"),
        ]
        for raw, code in bad:
            socket.send(raw)
            (event,) = receive(socket, "error")
            assert event["type"] == "error" and event["error"]["code"] == code, event
            assert event["error"]["message"] and "\n" not in event["error"]["message"]
        assert event["error"]["event_id"] is None
        socket.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "mine"}))
        assert receive(socket, "error")[-1]["error"]["event_id"] == "mine"
        # manual turns: no server VAD, the client commits
        turn_off = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
        socket.send(json.dumps({"type": "session.update", "session": turn_off}))
        assert receive(socket, "session.updated")[-1]["session"]["audio"]["input"]["turn_detection"] is None
        pcm = pcm24k(speech_files[2]).tobytes()
        for audio in chunks(pcm):
            socket.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        socket.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = receive(socket, "conversation.item.input_audio_transcription.completed")
    assert events[0]["type"] == "input_audio_buffer.committed"
    with TritonkitClient(grpc_url) as triton:
        (want,) = triton.transcribe([wav_bytes(pcm)])
    assert events[-1]["transcript"] == want.text


def test_eight_live_sessions_complete_together(live, speech_files):
    base, _ = live

    def one(k: int) -> list[str]:
        pcm = recording([speech_files[k % 4]])
        with plain_session(base) as socket:
            receive(socket, "session.created")
            socket.send(json.dumps({"type": "session.update", "session": SESSION}))
            receive(socket, "session.updated")
            for audio in chunks(pcm, 200):
                socket.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
            events = receive(socket, "conversation.item.input_audio_transcription.completed", timeout=300)
        return [e["type"] for e in events] + [events[-1].get("transcript", "")]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for kinds in results:
        assert kinds[-2] == "conversation.item.input_audio_transcription.completed" and kinds[-1].strip(), kinds


def test_a_wrong_key_or_intent_is_refused(live):
    base, _ = live
    url = base.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus, match=r"403"):  # refused before the handshake completes
        websockets_client.connect(url, additional_headers={"Authorization": "Bearer wrong"})
    with websockets_client.connect(
        base.replace("http://", "ws://") + "/v1/realtime?model=gpt-4o-realtime",
        additional_headers={"Authorization": f"Bearer {KEY}"},
    ) as socket:
        event = json.loads(socket.recv(timeout=10))
    assert event["type"] == "error" and event["error"]["code"] == "invalid_intent"
