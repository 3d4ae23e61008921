"""Spoken sample clips for tests, the demo and benchmarks (no data set can be downloaded here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tritonkit.errors import TritonkitError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there. This is a test of the speech recognition system.",
    "Please call me back tomorrow morning at nine.",
    "The weather is nice today and the sun is shining.",
    "We will meet in the conference room after lunch.",
    "She sells sea shells by the sea shore.",
    "I would like a cup of coffee with milk.",
    "The train leaves the station at ten o'clock.",
    "Thank you very much for your help.",
    "My favorite color is blue.",
    "Open the window, it is very warm in here.",
]
# American English voice, slowed down with gaps between words: what tiny.en hears best of espeak.
ESPEAK_VOICE = ["-v", "en-us", "-s", "130", "-g", "4"]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, path: Path) -> Path:
    """espeak-ng speech of `text` as a 22.05 kHz WAV file."""
    if not espeak_available():
        raise TritonkitError("espeak-ng is not installed", hint="apt-get install espeak-ng")
    subprocess.run(["espeak-ng", *ESPEAK_VOICE, "-w", str(path), text], check=True, capture_output=True)
    return Path(path)


# Speakers for diarization: espeak-ng voices and speeds that a speaker encoder tells apart
VOICES = [("en-us", "150"), ("en+f3", "160"), ("en-gb-x-rp+m7", "140"), ("en+f5", "170"), ("en-us+m3", "135")]
BACKCHANNEL = ["Yes.", "Okay.", "Right.", "I see."]


def voice_samples(text: str, voice: tuple[str, str], path: Path):
    """espeak-ng speech of `text` in `voice` (name, words per minute) as 16 kHz float32 samples."""
    import numpy as np
    import soundfile
    import soxr

    if not espeak_available():
        raise TritonkitError("espeak-ng is not installed", hint="apt-get install espeak-ng")
    subprocess.run(["espeak-ng", "-v", voice[0], "-s", voice[1], "-w", str(path), text], check=True)
    samples, rate = soundfile.read(str(path), dtype="float32")
    return soxr.resample(samples, rate, 16000).astype(np.float32)


def conversation(seed: int, speakers: int, folder: Path, turns: int = 10):
    """An assembled conversation with known turns: `turns` turns of `speakers` voices (of VOICES),
    never two in a row by one voice, 1 to 3 sample sentences each (cut at 10 s), one turn in five
    (not the first) a short back-channel, pauses of 0.2-0.8 s. Returns the 16 kHz samples and the
    true speech [(start s, end s, the speaker's index in VOICES)]: each turn's speech, its pauses
    of 0.2 s or more (between sentences) left out."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pieces, truth, t = [], [], 0.0
    who = list(rng.choice(len(VOICES), speakers, replace=False))
    last = None
    for k in range(turns):
        s = int(rng.integers(speakers))
        if s == last:
            s = (s + 1) % speakers
        last = s
        if k > 0 and rng.random() < 0.2:
            text = BACKCHANNEL[int(rng.integers(len(BACKCHANNEL)))]
        else:
            n = int(rng.integers(1, 4))
            text = " ".join(SENTENCES[int(i)] for i in rng.integers(len(SENTENCES), size=n))
        audio = voice_samples(text, VOICES[who[s]], Path(folder) / f"{seed}_{k}.wav")[: 10 * 16000]
        pause = float(rng.uniform(0.2, 0.8))
        pieces += [audio, np.zeros(int(pause * 16000), np.float32)]
        truth += [(t + a, t + b, int(who[s])) for a, b in voiced_spans(audio)]
        t += len(audio) / 16000 + pause
    return np.concatenate(pieces), truth


def voiced_spans(audio, silence_s: float = 0.2, level: float = 1e-3) -> list[tuple[float, float]]:
    """(start, end) seconds of a synthesised clip's speech: its pauses of at least `silence_s`
    (espeak-ng's silences are near-digital: below `level`) left out, as a reference turn marks only
    speech."""
    import numpy as np

    frame = 160  # 10 ms
    loud = np.abs(audio[: len(audio) // frame * frame]).reshape(-1, frame).max(axis=1) >= level
    spans: list[tuple[float, float]] = []
    quiet_frames = round(silence_s * 100)
    for k in np.flatnonzero(loud):
        start = k / 100
        if spans and start - spans[-1][1] < quiet_frames / 100:
            spans[-1] = (spans[-1][0], (k + 1) / 100)
        else:
            spans.append((start, (k + 1) / 100))
    return spans
