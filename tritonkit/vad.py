"""Voice activity detection as faster-whisper applies it before Whisper (its `vad_filter`).

Silero VAD (the ONNX model faster-whisper ships in `faster_whisper/assets/`, MIT licence) gives a
speech probability per 512 samples (32 ms at 16 kHz); `speech_chunks` turns them into speech
chunks with faster-whisper's defaults (threshold 0.5, silence below 0.35 for 2 s ends a chunk,
400 ms of padding); `SpeechMap` joins the chunks into one speech-only signal and maps times on
it back to the original file. Ported from faster-whisper 1.2 (`vad.py`, MIT) and silero-vad (MIT).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tritonkit.errors import TritonkitError

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 512  # one probability per 32 ms
CONTEXT_SAMPLES = 64  # each chunk is given the last 64 samples of the one before it
MODEL_FILE = "silero_vad_v6.onnx"


@dataclass(frozen=True)
class VadOptions:
    """faster-whisper's VadOptions defaults."""

    threshold: float = 0.5
    neg_threshold: float | None = None  # default: threshold - 0.15
    min_speech_duration_ms: int = 0
    max_speech_duration_s: float = float("inf")
    min_silence_duration_ms: int = 2000
    speech_pad_ms: int = 400


def bundled_model() -> Path:
    """The Silero VAD ONNX file of the installed faster-whisper wheel (nothing is downloaded)."""
    try:
        from faster_whisper.utils import get_assets_path
    except ImportError:
        raise TritonkitError(
            "voice activity detection needs the Silero VAD model from faster-whisper's wheel",
            hint="pip install faster-whisper (it ships silero_vad_v6.onnx), then rebuild",
        ) from None
    path = Path(get_assets_path()) / MODEL_FILE
    if not path.is_file():
        raise TritonkitError(
            f"{path} is missing from the installed faster-whisper", hint="pip install -U faster-whisper"
        )
    return path


def model_inputs(audio: np.ndarray) -> np.ndarray:
    """16 kHz samples -> the model's rows: each 512-sample chunk after 64 samples of context."""
    padded = np.pad(audio.astype(np.float32), (0, CHUNK_SAMPLES - len(audio) % CHUNK_SAMPLES))
    chunks = padded.reshape(-1, CHUNK_SAMPLES)
    context = chunks[..., -CONTEXT_SAMPLES:].copy()
    context[-1] = 0
    context = np.roll(context, 1, 0)
    return np.concatenate([context, chunks], 1)


def speech_probabilities(session, audio: np.ndarray, batch: int = 10000) -> np.ndarray:
    """One probability per 512 samples from an ONNX Runtime session of the Silero model."""
    rows = model_inputs(audio)
    h = np.zeros((1, 1, 128), dtype=np.float32)
    c = np.zeros((1, 1, 128), dtype=np.float32)
    out = []
    for i in range(0, len(rows), batch):
        probs, h, c = session.run(None, {"input": rows[i : i + batch], "h": h, "c": c})
        out.append(probs)
    return np.concatenate(out, axis=0).reshape(-1)


def speech_chunks(probs: np.ndarray, audio_samples: int, options: VadOptions = VadOptions()) -> list[dict]:
    """[{start, end}] in samples: faster-whisper's get_speech_timestamps on these probabilities."""
    window = CHUNK_SAMPLES
    threshold = options.threshold
    neg_threshold = options.neg_threshold if options.neg_threshold is not None else max(threshold - 0.15, 0.01)
    min_speech = SAMPLE_RATE * options.min_speech_duration_ms / 1000
    pad = SAMPLE_RATE * options.speech_pad_ms / 1000
    max_speech = SAMPLE_RATE * options.max_speech_duration_s - window - 2 * pad
    min_silence = SAMPLE_RATE * options.min_silence_duration_ms / 1000
    min_silence_at_max_speech = SAMPLE_RATE * 98 / 1000

    triggered = False
    speeches: list[dict] = []
    current: dict = {}
    temp_end = prev_end = next_start = 0
    for i, prob in enumerate(probs):
        if prob >= threshold and temp_end:
            temp_end = 0
            if next_start < prev_end:
                next_start = window * i
        if prob >= threshold and not triggered:
            triggered = True
            current["start"] = window * i
            continue
        if triggered and window * i - current["start"] > max_speech:
            if prev_end:
                current["end"] = prev_end
                speeches.append(current)
                current = {}
                if next_start < prev_end:
                    triggered = False
                else:
                    current["start"] = next_start
                prev_end = next_start = temp_end = 0
            else:
                current["end"] = window * i
                speeches.append(current)
                current = {}
                prev_end = next_start = temp_end = 0
                triggered = False
                continue
        if prob < neg_threshold and triggered:
            if not temp_end:
                temp_end = window * i
            if window * i - temp_end > min_silence_at_max_speech:
                prev_end = temp_end
            if window * i - temp_end < min_silence:
                continue
            current["end"] = temp_end
            if current["end"] - current["start"] > min_speech:
                speeches.append(current)
            current = {}
            prev_end = next_start = temp_end = 0
            triggered = False
            continue
    if current and audio_samples - current["start"] > min_speech:
        current["end"] = audio_samples
        speeches.append(current)
    return _padded(speeches, audio_samples, pad)


def _padded(speeches: list[dict], audio_samples: int, pad: float) -> list[dict]:
    """Each chunk widened by `pad` samples on both sides, or by half the silence to its neighbour
    where that is shorter than two pads (faster-whisper's last step)."""
    for i, speech in enumerate(speeches):
        if i == 0:
            speech["start"] = int(max(0, speech["start"] - pad))
        if i != len(speeches) - 1:
            silence = speeches[i + 1]["start"] - speech["end"]
            if silence < 2 * pad:
                speech["end"] += int(silence // 2)
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - silence // 2))
            else:
                speech["end"] = int(min(audio_samples, speech["end"] + pad))
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - pad))
        else:
            speech["end"] = int(min(audio_samples, speech["end"] + pad))
    return speeches


@dataclass(frozen=True)
class SpeechMap:
    """Speech chunks joined into one signal, and the way back to the original timeline
    (faster-whisper's SpeechTimestampsMap)."""

    chunk_ends: tuple[int, ...]  # each chunk's end on the joined signal, in samples
    silence_before_s: tuple[float, ...]  # seconds of the original removed before each chunk

    @classmethod
    def of(cls, chunks: list[dict]) -> SpeechMap:
        ends, silences, previous_end, silent = [], [], 0, 0
        for chunk in chunks:
            silent += chunk["start"] - previous_end
            previous_end = chunk["end"]
            ends.append(chunk["end"] - silent)
            silences.append(silent / SAMPLE_RATE)
        return cls(tuple(ends), tuple(silences))

    def chunk_index(self, time_s: float) -> int:
        return min(bisect.bisect(self.chunk_ends, int(time_s * SAMPLE_RATE)), len(self.chunk_ends) - 1)

    def original_span(self, start_s: float, end_s: float) -> tuple[float, float]:
        """A segment's times on the original file. Both ends go into the speech chunk that holds the
        segment's middle (as faster-whisper places a word): mapped one by one, as faster-whisper
        maps a segment, a start on a chunk's edge lands in the pause before the segment's speech."""
        if not self.chunk_ends:
            return start_s, end_s
        index = self.chunk_index((start_s + end_s) / 2)
        low = (self.chunk_ends[index - 1] if index else 0) / SAMPLE_RATE
        high = self.chunk_ends[index] / SAMPLE_RATE
        shift = self.silence_before_s[index]
        return (
            round(min(max(start_s, low), high) + shift, 3),
            round(min(max(end_s, low), high) + shift, 3),
        )


def join_speech(audio: np.ndarray, chunks: list[dict]) -> np.ndarray:
    """The speech chunks of `audio` one after another (empty when there is no speech)."""
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([audio[c["start"] : c["end"]] for c in chunks]).astype(np.float32)


def session(path: str | os.PathLike):
    """An ONNX Runtime session set up as faster-whisper sets up Silero's (one thread, no arena)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=options)
