"""Audio file bytes -> 16 kHz mono -> 30 s windows -> Whisper log-mel features.

The log-mel computation is WhisperFeatureExtractor's (pad to 30 s, periodic Hann STFT with
n_fft 400 and hop 160, power spectrum, the model's own Slaney mel filters, log10, clamp at
max - 8, (x + 4) / 4), vectorised over windows with numpy. `AudioRecipe.padding` "features" pads
as faster-whisper does instead: the log-mel of the audio alone (normalised over its own frames),
then zero features up to 3000 frames; on short clips the encoder then sees what faster-whisper
gives it (docs/BENCHMARKS.md: the WER difference between the two comes from this alone).

Long audio is cut into windows of at most 30 s. Each cut is placed at the quietest 100 ms of the
last `search_seconds` before the 30 s mark, so words are rarely split and the texts of the
windows are simply joined.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np

from tritonkit.errors import InputError

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
WINDOW_SECONDS = 30
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS
FRAMES = WINDOW_SAMPLES // HOP  # 3000
PADDINGS = ("audio", "features")  # OpenAI's and transformers' / faster-whisper's


@dataclass(frozen=True)
class AudioRecipe:
    n_mels: int = 80
    max_seconds: float = 600.0
    max_bytes: int = 200 * 1024 * 1024
    search_seconds: float = 5.0  # where to look for a quiet cut before each 30 s mark
    padding: str = "audio"  # "audio": silence to 30 s, then log-mel; "features": zero frames after the log-mel

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AudioRecipe:
        return cls(**json.loads(text))

    def with_options(self, **options) -> AudioRecipe:
        import dataclasses

        recipe = dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})
        if recipe.max_seconds <= 0:
            raise InputError(f"the audio duration limit must be > 0 s, got {recipe.max_seconds}")
        if recipe.padding not in PADDINGS:
            raise InputError(f"--audio-padding {recipe.padding!r}: use one of {', '.join(PADDINGS)}")
        return recipe


def content_frames(piece: np.ndarray) -> int:
    """How many of a window's 3000 frames hold its audio when padding="features": faster-whisper
    pads the audio by one hop, normalises over the STFT's frames but the last, and keeps one fewer
    (`content_frames = features.shape[-1] - 1` in its transcribe)."""
    return min(len(piece) // HOP, FRAMES)


def pad_window(piece: np.ndarray) -> np.ndarray:
    """A piece of <= 30 s zero-padded to exactly 30 s, as the feature extractor pads."""
    window = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    window[: min(len(piece), WINDOW_SAMPLES)] = piece[:WINDOW_SAMPLES]
    return window


def decode_audio(data: bytes, recipe: AudioRecipe) -> np.ndarray:
    """Encoded audio (WAV, FLAC, OGG/Vorbis/Opus, MP3 where libsndfile has it) -> float32 16 kHz mono."""
    import soundfile

    if len(data) == 0:
        raise InputError("AUDIO: empty input (0 bytes)", reason="empty")
    if len(data) > recipe.max_bytes:
        raise InputError(f"AUDIO: {len(data)} bytes exceeds the {recipe.max_bytes} byte limit", reason="too_large")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            seconds = sound.frames / sound.samplerate if sound.samplerate else 0
            if seconds > recipe.max_seconds:
                raise InputError(
                    f"AUDIO: {seconds:.0f} s exceeds the {recipe.max_seconds:.0f} s limit", reason="too_long"
                )
            samples = sound.read(dtype="float32", always_2d=True)
            rate = sound.samplerate
    except InputError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        reason = str(exc).strip().split(": ")[-1] or type(exc).__name__  # drop "Error opening <BytesIO ...>"
        raise InputError(f"AUDIO: not a decodable audio file ({reason})", reason="undecodable") from None
    if samples.shape[0] == 0:
        raise InputError("AUDIO: the file holds no samples", reason="empty")
    mono = samples.mean(axis=1, dtype=np.float32)
    return resample(mono, rate)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import soxr

    return soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def split_windows(samples: np.ndarray, recipe: AudioRecipe) -> list[np.ndarray]:
    """Cut into pieces of at most 30 s, each cut at the quietest 100 ms before the 30 s mark."""
    pieces, start = [], 0
    search = int(recipe.search_seconds * SAMPLE_RATE)
    block = SAMPLE_RATE // 10
    while len(samples) - start > WINDOW_SAMPLES:
        region = samples[start + WINDOW_SAMPLES - search : start + WINDOW_SAMPLES]
        energy = np.square(region[: len(region) // block * block].reshape(-1, block)).mean(axis=1)
        quietest = int(np.argmin(energy))
        cut = start + WINDOW_SAMPLES - search + quietest * block + block // 2
        pieces.append(samples[start:cut])
        start = cut
    pieces.append(samples[start:])
    return pieces


def hann_window() -> np.ndarray:
    """Periodic Hann window of N_FFT samples (as torch.hann_window and transformers' "hann")."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def log_mel_whole(samples: np.ndarray, mel_filters: np.ndarray, padding: str = "audio") -> np.ndarray:
    """A whole file's features [n_mels, len // 160], normalised over the whole file: what the
    feature extractor gives long-form generation (truncation=False, padding="longest"), or with
    padding="features" what faster-whisper's transcribe seeks through (the audio padded by one hop,
    normalised over one frame more than it keeps)."""
    kept = len(samples) // HOP
    samples = samples.astype(np.float32)
    if padding == "features":
        samples = np.pad(samples, (0, HOP))
    padded = np.pad(samples, (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][: len(samples) // HOP]
    spectrum = np.fft.rfft(frames * hann_window(), axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    log_spec = np.log10(np.maximum(power @ mel_filters.astype(np.float32), 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)[:kept]
    return np.ascontiguousarray(((log_spec + 4.0) / 4.0).T, dtype=np.float32)


def log_mel(windows: list[np.ndarray], mel_filters: np.ndarray, padding: str = "audio") -> np.ndarray:
    """Pieces of <= 30 s -> features [N, n_mels, 3000]. `mel_filters` is [n_freq=201, n_mels].

    padding="features": every window gets one hop of silence after its 30 s (faster-whisper pads
    its audio by one hop), is normalised over its content frames (and the one after), and its
    other frames are 0."""
    padded = np.stack([pad_window(piece) for piece in windows])
    if padding == "features":
        padded = np.pad(padded, ((0, 0), (0, HOP)))
    # center=True with reflect padding, as torch.stft in the feature extractor
    padded = np.pad(padded, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=1)[:, ::HOP][:, :FRAMES]  # [N, 3000, 400]
    spectrum = np.fft.rfft(frames * hann_window(), axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    mel = power @ mel_filters.astype(np.float32)  # [N, 3000, n_mels]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    if padding != "features":
        log_spec = np.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
        return np.ascontiguousarray(((log_spec + 4.0) / 4.0).transpose(0, 2, 1), dtype=np.float32)
    kept = np.array([content_frames(w) for w in windows])[:, None]
    content = (np.arange(FRAMES)[None, :] < kept)[:, :, None]
    normalised_over = (np.arange(FRAMES)[None, :] <= kept)[:, :, None]  # one frame more, as faster-whisper
    peak = np.where(normalised_over, log_spec, -np.inf).max(axis=(1, 2), keepdims=True)
    features = np.where(content, (np.maximum(log_spec, peak - 8.0) + 4.0) / 4.0, 0.0)
    return np.ascontiguousarray(features.transpose(0, 2, 1), dtype=np.float32)
