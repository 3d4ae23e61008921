"""Served image preprocessing equals CLIPImageProcessor, and bad bytes fail with a clear message."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import encode_image, random_image
from tritonkit.errors import InputError
from tritonkit.preprocessing.image import ImageRecipe, image_bytes_to_pixels


@pytest.fixture(scope="module")
def processor(clip_loaded):
    return clip_loaded[1].image_processor


CASES = {
    "landscape jpeg": lambda: encode_image(random_image(480, 640, 1), "JPEG"),
    "portrait png": lambda: encode_image(random_image(517, 300, 2), "PNG"),
    "rgba png": lambda: encode_image(random_image(120, 90, 3, channels=4), "PNG", mode="RGBA"),
    "grayscale jpeg": lambda: encode_image(random_image(64, 64, 4, channels=1)[..., 0], "JPEG"),
    "cmyk jpeg": lambda: encode_image(random_image(225, 301, 5, channels=4), "JPEG", mode="CMYK"),
    "tiny 1x1": lambda: encode_image(random_image(1, 1, 6), "PNG"),
    "very wide": lambda: encode_image(random_image(20, 2000, 7), "PNG"),
    "exact size": lambda: encode_image(random_image(224, 224, 8), "PNG"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pixels_equal_clip_image_processor_when_image_is(case, processor):
    data = CASES[case]()
    ours = image_bytes_to_pixels(data, ImageRecipe.from_processor(processor))
    reference = processor(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
    assert ours.shape == reference.shape
    # Same decoder, same PIL resize, same crop offsets: only float rounding may differ.
    assert np.abs(ours - reference).max() <= 1e-6


def test_recipe_round_trips_through_json(processor):
    recipe = ImageRecipe.from_processor(processor)
    assert ImageRecipe.from_json(recipe.to_json()) == recipe


def test_decode_rejects_images_when_over_the_pixel_limit(processor):
    recipe = ImageRecipe.from_processor(processor)
    bomb = encode_image(np.zeros((3000, 3000), dtype=np.uint8), "PNG")  # 9 Mpx, a few KB
    small = ImageRecipe(**{**recipe.__dict__, "max_pixels": 1_000_000})
    with pytest.raises(InputError, match="pixel limit"):
        image_bytes_to_pixels(bomb, small)


def test_decode_rejects_input_when_over_the_byte_limit(processor):
    recipe = ImageRecipe(**{**ImageRecipe.from_processor(processor).__dict__, "max_bytes": 10})
    with pytest.raises(InputError, match="byte limit"):
        image_bytes_to_pixels(b"\x89PNG" + b"\0" * 20, recipe)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048))
def test_decode_fails_cleanly_when_bytes_are_arbitrary(data, processor):
    recipe = ImageRecipe.from_processor(processor)
    try:
        pixels = image_bytes_to_pixels(data, recipe)
    except InputError as exc:
        assert str(exc).startswith("IMAGE: ")
    else:
        assert pixels.shape == (3, 224, 224)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=4000))
def test_decode_fails_cleanly_when_a_jpeg_is_truncated(cut, processor):
    data = encode_image(random_image(64, 80, 9), "JPEG")[:cut]
    try:
        image_bytes_to_pixels(data, ImageRecipe.from_processor(processor))
    except InputError as exc:
        assert str(exc).startswith("IMAGE: ")


def test_jpeg_draft_decodes_large_jpegs_at_a_reduced_scale_with_the_same_output(clip_loaded, tiny_clip_dir, tmp_path):
    import dataclasses

    from tritonkit.build import build
    from tritonkit.families.base import BuildOptions, ImageOptions
    from tritonkit.preprocessing.image import PIL_FORMATS, decode_image

    _, loaded = clip_loaded
    recipe = ImageRecipe.from_processor(loaded.image_processor).with_options(formats=PIL_FORMATS)
    drafted = dataclasses.replace(recipe, jpeg_draft=True)
    large = encode_image(random_image(1600, 2400, seed=4), "JPEG")
    assert decode_image(large, recipe).size == (2400, 1600)
    width, height = decode_image(large, drafted).size
    assert width < 2400 and 2400 % width == 0 and min(width, height) >= 2 * recipe.shortest_edge, (width, height)
    full, scaled = image_bytes_to_pixels(large, recipe), image_bytes_to_pixels(large, drafted)
    assert full.shape == scaled.shape and np.abs(full - scaled).mean() < 0.05
    small = encode_image(random_image(240, 320, seed=4), "JPEG")  # no smaller scale covers 2x the resize
    assert np.array_equal(image_bytes_to_pixels(small, recipe), image_bytes_to_pixels(small, drafted))
    with pytest.raises(InputError, match="--jpeg-draft decodes with PIL: add --preprocessing python"):
        build("clip", str(tiny_clip_dir), tmp_path / "repo", options=BuildOptions(family=ImageOptions(jpeg_draft=True)))
