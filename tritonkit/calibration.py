"""The built-in calibration and held-out data, varied on purpose.

A reduced-precision build is calibrated on one part of this and judged on the other. Judged on
smooth synthetic photos alone, an INT8 CLIP passed at min cosine 0.9998 and gave 0.984 served on
other images: activations of text, texture, noise and flat graphics reach ranges smooth photos
never do. So the built-in images cycle through those kinds, at several sizes and aspect ratios,
in colour, grayscale and with transparency; the built-in audio has several voices, speeds, noise
and silence. It is still not the user's data: reports say when they were measured on it
(`BUILTIN_NOTE`), and `--calibration-data` takes the user's own.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

BUILTIN_NOTE = "the built-in varied set, not your data: pass --calibration-data DIR with your own for a gate that predicts what your users see"


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour regions with mild grain: a stand-in photo."""
    from PIL import Image

    coarse = rng.integers(0, 256, (max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)


def _text(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Dark lines of text on a light page (a document, a screenshot, a sign)."""
    from PIL import Image, ImageDraw

    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "invoice",
        "total",
        "42.50",
        "EUR",
        "page",
        "3",
        "of",
        "7",
    ]
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(215, 256, 3)))
    draw = ImageDraw.Draw(image)
    for y in range(4, height - 10, 14):
        line = " ".join(rng.choice(words, 12))
        draw.text((4, y), line, fill=tuple(int(v) for v in rng.integers(0, 60, 3)))
    return np.asarray(image)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """High-frequency stripes and checks (fabric, grilles, brickwork)."""
    y, x = np.mgrid[0:height, 0:width]
    period = rng.integers(3, 9)
    angle = rng.uniform(0, np.pi)
    waves = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    checks = ((x // period + y // period) % 2) * 2 - 1
    base = 127 + 100 * (0.6 * waves + 0.4 * checks)
    colour = rng.uniform(0.5, 1.0, 3)
    return np.clip(base[..., None] * colour, 0, 255).astype(np.uint8)


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _graphic(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Flat saturated shapes with hard edges (logos, charts, user interfaces)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 2 + 9)), y0 + int(rng.integers(8, height // 2 + 9))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.choice([0, 255], 3)))
    return np.asarray(image)


def _dark(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An underexposed photo: values crowded near black."""
    return (_photo(rng, height, width) // 6).astype(np.uint8)


# (kind, make, (height, width)): sizes from thumbnails to large photos, portrait and panoramas
IMAGE_KINDS: list[tuple[str, Callable[[np.random.Generator, int, int], np.ndarray], tuple[int, int]]] = [
    ("photo", _photo, (480, 640)),
    ("text", _text, (600, 800)),
    ("texture", _texture, (256, 256)),
    ("noise", _noise, (224, 224)),
    ("graphic", _graphic, (300, 900)),
    ("photo-portrait", _photo, (1024, 576)),
    ("dark", _dark, (360, 480)),
    ("photo-small", _photo, (64, 96)),
]


def varied_images(count: int = 32, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` encoded images, (kind, bytes), cycling through IMAGE_KINDS; every kind comes as
    JPEG and also, in turn, as grayscale JPEG and as PNG with transparency."""
    from PIL import Image

    images = []
    for index in range(count):
        kind, make, (height, width) = IMAGE_KINDS[index % len(IMAGE_KINDS)]
        rng = np.random.default_rng(seed * 1000 + index)
        pixels = make(rng, height, width)
        variant = (index // len(IMAGE_KINDS)) % 3  # 0 colour JPEG, 1 grayscale JPEG, 2 RGBA PNG
        image = Image.fromarray(pixels)
        buffer = io.BytesIO()
        if variant == 1:
            image.convert("L").save(buffer, format="JPEG", quality=85)
            kind += "/gray"
        elif variant == 2:
            alpha = np.full(pixels.shape[:2], 255, dtype=np.uint8)
            alpha[: height // 3] = rng.integers(0, 256)  # a translucent band across the top
            image = Image.fromarray(np.dstack([pixels, alpha]), mode="RGBA")
            image.save(buffer, format="PNG")
            kind += "/rgba"
        else:
            image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
        images.append((kind, buffer.getvalue()))
    return images


# espeak-ng voices and speeds: American slow, British quick, a higher-pitched variant (three, so
# that taking every second clip still holds every voice)
VOICES: list[list[str]] = [
    ["-v", "en-us", "-s", "130", "-g", "4"],
    ["-v", "en-gb-x-rp", "-s", "175"],
    ["-v", "en-us+f3", "-s", "145", "-p", "70"],
]


def varied_speech(sentences: list[str], folder) -> list[tuple[str, bytes, str]]:
    """(kind, WAV bytes, transcript) for the built-in audio: each sentence in the next voice, every
    fourth with noise at about 10 dB SNR; then a clip of silence and one of noise alone (transcript
    ""), where a model that hallucinates words is charged for each one."""
    import subprocess
    from pathlib import Path

    import soundfile

    clips = []
    rng = np.random.default_rng(7)
    for index, sentence in enumerate(sentences):
        voice = VOICES[index % len(VOICES)]
        path = Path(folder) / f"speech_{index}.wav"
        subprocess.run(["espeak-ng", *voice, "-w", str(path), sentence], check=True, capture_output=True)
        kind = f"voice {voice[1]}"
        if index % 4 == 3:
            samples, rate = soundfile.read(path, dtype="float32")
            power = float(np.mean(samples**2)) or 1e-6
            samples = samples + rng.normal(0, np.sqrt(power / 10), samples.shape).astype(np.float32)
            soundfile.write(path, np.clip(samples, -1, 1), rate)
            kind += " + noise"
        clips.append((kind, path.read_bytes(), sentence))
    for kind, samples in (
        ("silence", np.zeros(16000 * 4, dtype=np.float32)),
        ("noise", rng.normal(0, 0.05, 16000 * 4).astype(np.float32)),
    ):
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, 16000, format="WAV")
        clips.append((kind, buffer.getvalue(), ""))
    return clips


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# 40 built-in images, every 5th held out: 5 is coprime with the 8 kinds of IMAGE_KINDS, so the
# held-out 8 are one of each kind
BUILTIN_IMAGES = 40
BUILTIN_HELDOUT_SHARE = 0.2
USER_HELDOUT_SHARE = 0.25  # of the user's own files (--calibration-data)


def builtin_images() -> tuple[list[bytes], str]:
    """The built-in varied images and how a report names them."""
    images = [data for _, data in varied_images(BUILTIN_IMAGES)]
    kinds = ", ".join(kind for kind, _, _ in IMAGE_KINDS)
    return images, f"{len(images)} built-in varied images ({kinds}; colour, grayscale and RGBA PNG)"


def calibration_images(calibration_dir: Path | None) -> tuple[list[bytes], str, float]:
    """The images an image tower is calibrated and judged on: the user's (`--calibration-data`) or
    the built-in varied ones; with how the report names them and the share to hold out."""
    from tritonkit.errors import InputError
    from tritonkit.precision import data_files

    if calibration_dir is None:
        images, source = builtin_images()
        return images, f"{source}: {BUILTIN_NOTE}", BUILTIN_HELDOUT_SHARE
    images = [p.read_bytes() for p in data_files(calibration_dir, IMAGE_SUFFIXES)]
    if not images:
        raise InputError(f"--calibration-data {calibration_dir}: needs images (jpg, png, ...)")
    return images, f"{len(images)} images from {calibration_dir}", USER_HELDOUT_SHARE


def synthetic_photo(seed: int, height: int = 360, width: int = 480) -> bytes:
    """A smooth random JPEG: a stand-in photo for benchmarks and soaks."""
    from PIL import Image

    rng = np.random.default_rng(1000 + seed)
    coarse = rng.integers(0, 256, (height // 24, width // 24, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
