"""Property tests: no input makes decoding or preprocessing crash; every failure is an InputError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import encode_image, random_image
from tritonkit.batched_model import string_rows
from tritonkit.errors import InputError
from tritonkit.preprocessing.audio import AudioRecipe, decode_audio, split_windows
from tritonkit.preprocessing.image import ImageRecipe, checked_image_bytes, image_bytes_to_pixels
from tritonkit.whisper_decoding import DecodeOptions, DecodeSettings

RECIPE = ImageRecipe(
    shortest_edge=64,
    resize_height=None,
    resize_width=None,
    crop_height=64,
    crop_width=64,
    resample=3,
    rescale_factor=1 / 255,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    max_bytes=1 << 20,
    max_pixels=4_000_000,
)
JPEG = encode_image(random_image(48, 80, seed=1), "JPEG")
PNG = encode_image(random_image(40, 30, seed=2), "PNG")


def wav(samples: np.ndarray, rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


WAV = wav(np.sin(np.arange(8000) / 10).astype(np.float32) * 0.3, 8000)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutations(seed_bytes: bytes):
    """Random bytes, truncations, and bit flips / splices of a valid file."""
    size = len(seed_bytes)
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, size).map(lambda n: seed_bytes[:n]),
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), min_size=1, max_size=12).map(
            lambda edits: _apply(seed_bytes, edits)
        ),
        st.binary(max_size=64).map(lambda junk: seed_bytes[: size // 2] + junk + seed_bytes[size // 2 :]),
    )


def _apply(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position] = value
    return bytes(out)


@FUZZ
@given(data=st.one_of(mutations(JPEG), mutations(PNG)))
def test_image_preprocessing_never_crashes(data):
    try:
        pixels = image_bytes_to_pixels(data, RECIPE)
        assert pixels.shape == (3, 64, 64) and np.isfinite(pixels).all()
    except InputError as exc:
        assert str(exc).startswith("IMAGE: ")


@FUZZ
@given(data=st.one_of(mutations(JPEG), mutations(PNG)))
def test_image_checks_before_dali_never_crash(data):
    try:
        checked = checked_image_bytes(data, RECIPE)
        assert isinstance(checked, bytes) and checked
    except InputError as exc:
        assert str(exc).startswith("IMAGE: ")


@FUZZ
@given(data=mutations(WAV))
def test_audio_decoding_never_crashes(data):
    try:
        samples = decode_audio(data, AudioRecipe(max_seconds=30))
        assert samples.dtype == np.float32 and np.isfinite(samples).all()
        assert sum(len(w) for w in split_windows(samples, AudioRecipe())) == len(samples)
    except InputError as exc:
        assert str(exc).startswith("AUDIO: ")


@FUZZ
@given(raw=st.binary(max_size=256))
def test_text_rows_accept_utf8_and_reject_the_rest_cleanly(raw):
    try:
        (text,) = string_rows(np.array([[raw]], dtype=object), "TEXT")
        assert text.encode("utf-8") == raw
    except InputError as exc:
        assert str(exc).startswith("TEXT: not valid UTF-8")


SETTINGS = DecodeSettings(
    start_token=1,
    end_token=2,
    no_timestamps_token=3,
    suppress_tokens=(),
    begin_suppress_tokens=(),
    max_length=10,
    multilingual=True,
    language_tokens={"en": 10, "fr": 11},
    task_tokens={"transcribe": 20, "translate": 21},
    language_names={"english": "en", "french": "fr"},
)


@FUZZ
@given(
    language=st.one_of(st.none(), st.text(max_size=12)),
    task=st.one_of(st.none(), st.text(max_size=12)),
    limit=st.one_of(st.none(), st.integers(-5, 10_000)),
)
def test_decode_options_are_valid_or_rejected_with_the_option_named(language, task, limit):
    try:
        options = DecodeOptions(language, task, limit).validate(SETTINGS)
        assert options.language in (None, "en", "fr") and options.task in ("transcribe", "translate")
    except InputError as exc:
        assert str(exc).split(":")[0] in ("LANGUAGE", "TASK", "MAX_NEW_TOKENS")


@pytest.mark.parametrize("size", [(5000, 5000), (100, 60000)])
def test_images_beyond_the_pixel_limit_are_rejected_from_the_header(size):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")  # compresses to a few kB: a decompression bomb
    with pytest.raises(InputError, match=r"IMAGE: .*(pixel limit|decompression bomb)"):
        checked_image_bytes(buffer.getvalue(), RECIPE)
