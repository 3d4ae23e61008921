"""Audio -> the partial utterances a GE2E speaker encoder embeds (resemblyzer's recipe, in numpy).

resemblyzer's `preprocess_wav` and `VoiceEncoder.embed_utterance`, step for step: 16 kHz mono;
the volume raised (never lowered) to -30 dBFS; silences longer than 7 VAD windows cut down to that
(webrtcvad, mode 3, 30 ms windows, a moving average of 8 and a dilation of 7); a 40-band mel power
spectrogram (25 ms windows every 10 ms, librosa's Slaney filters, not a log); then 1.6 s partial
utterances (160 frames) 1.3 per second, the last kept only if it covers 75% of its frames (the
audio zero-padded to it). The encoder embeds each partial; the utterance's embedding is their
mean, L2-normalised. tests/test_speaker.py checks every step against the package's own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from tritonkit.errors import InputError
from tritonkit.preprocessing.audio import (
    HOP,
    N_FFT,
    SAMPLE_RATE,
    AudioRecipe,
    decode_audio,
    hann_window,
)  # 25 ms windows every 10 ms, as Whisper's

N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s
INT16_MAX = 2**15 - 1
VAD_WINDOW = 480  # 30 ms: webrtcvad takes 10, 20 or 30
VAD_AVERAGE = 8  # windows averaged to smooth the voice flags
VAD_MAX_SILENCE = 6  # windows of silence kept between voiced ones
TARGET_DBFS = -30.0


@dataclass(frozen=True)
class VoiceRecipe:
    rate: float = 1.3  # partial utterances per second
    min_coverage: float = 0.75  # the last partial is kept if the audio covers this share of it
    max_seconds: float = 600.0
    max_bytes: int = 200 * 1024 * 1024

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VoiceRecipe:
        return cls(**json.loads(text))

    @property
    def audio(self) -> AudioRecipe:
        """How a file is decoded: within these limits, to 16 kHz mono."""
        return AudioRecipe(max_seconds=self.max_seconds, max_bytes=self.max_bytes)


def mel_filters() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40): Slaney's scale and norm, [40, 201]."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return bank.T.astype(np.float32)


def normalize_volume(wav: np.ndarray) -> np.ndarray:
    """Raised to TARGET_DBFS when quieter; a louder file is left as it is."""
    rms = float(np.sqrt(np.mean((wav.astype(np.float64) * INT16_MAX) ** 2)))
    if rms == 0.0:
        raise InputError("AUDIO: every sample is zero: there is no voice to embed", reason="no_voice")
    change = TARGET_DBFS - 20 * np.log10(rms / INT16_MAX)
    return wav if change < 0 else (wav * 10 ** (change / 20)).astype(np.float32)


def voiced_mask(wav: np.ndarray) -> np.ndarray:
    """Per VAD window: voiced, or within VAD_MAX_SILENCE windows of voice."""
    import webrtcvad
    from scipy.ndimage import binary_dilation

    pcm = np.round(wav * INT16_MAX).astype(np.int16).tobytes()
    vad = webrtcvad.Vad(3)
    step = VAD_WINDOW * 2  # bytes
    flags = np.array([vad.is_speech(pcm[i : i + step], SAMPLE_RATE) for i in range(0, len(pcm), step)], dtype=float)
    padded = np.concatenate((np.zeros((VAD_AVERAGE - 1) // 2), flags, np.zeros(VAD_AVERAGE // 2)))
    sums = np.cumsum(padded, dtype=float)
    sums[VAD_AVERAGE:] = sums[VAD_AVERAGE:] - sums[:-VAD_AVERAGE]
    smoothed = np.round(sums[VAD_AVERAGE - 1 :] / VAD_AVERAGE).astype(bool)
    return binary_dilation(smoothed, np.ones(VAD_MAX_SILENCE + 1))


def trim_long_silences(wav: np.ndarray) -> np.ndarray:
    """The file with every silence longer than VAD_MAX_SILENCE windows shortened to that."""
    wav = wav[: len(wav) - len(wav) % VAD_WINDOW]
    if not len(wav):
        return wav
    return wav[np.repeat(voiced_mask(wav), VAD_WINDOW)]


def preprocess(samples: np.ndarray) -> np.ndarray:
    """16 kHz mono samples -> the waveform the encoder's partials are cut from."""
    wav = trim_long_silences(normalize_volume(samples))
    if not len(wav):
        raise InputError("AUDIO: no voice found (webrtcvad): nothing to embed", reason="no_voice")
    return wav


def mel_spectrogram(wav: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """librosa.feature.melspectrogram(y, sr=16000, n_fft=400, hop_length=160, n_mels=40).T: frames
    centred (zero padding), periodic Hann window, power spectrum, mel filters. [frames, 40]."""
    padded = np.pad(wav.astype(np.float32), (N_FFT // 2, N_FFT // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * hann_window(), axis=1)) ** 2
    return (power.astype(np.float32) @ filters.T).astype(np.float32)


def partial_slices(n_samples: int, recipe: VoiceRecipe) -> list[tuple[int, int]]:
    """The mel frame ranges of the partial utterances (VoiceEncoder.compute_partial_slices)."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    frame_step = int(np.round((SAMPLE_RATE / recipe.rate) / HOP))
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    slices = [(i, i + PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    last = slices[-1]
    coverage = (n_samples - last[0] * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < recipe.min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


def partials(wav: np.ndarray, filters: np.ndarray, recipe: VoiceRecipe) -> np.ndarray:
    """A preprocessed waveform -> its partial utterances' mel frames, [partials, 160, 40]."""
    slices = partial_slices(len(wav), recipe)
    needed = slices[-1][1] * HOP
    if needed >= len(wav):
        wav = np.pad(wav, (0, needed - len(wav)))
    mel = mel_spectrogram(wav, filters)
    return np.stack([mel[start:stop] for start, stop in slices])


def file_partials(data: bytes, filters: np.ndarray, recipe: VoiceRecipe) -> np.ndarray:
    """An encoded audio file -> its partial utterances' mel frames: decoded, preprocessed, cut."""
    return partials(preprocess(decode_audio(data, recipe.audio)), filters, recipe)


def average(partial_embeddings: np.ndarray) -> np.ndarray:
    """The utterance's embedding: the partials' mean, L2-normalised."""
    mean = partial_embeddings.mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)
