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
