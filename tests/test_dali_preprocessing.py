"""DALI pipelines: parity with the transformers processors, serialized files, GPU repositories."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.conftest import EMBEDDING_FAMILIES, has_gpu, random_image
from tritonkit.preprocessing.dali import (
    DaliRunner,
    RowFailed,
    image_graph,
    image_pixels,
    log_mel_features,
    log_mel_graph,
    serialize,
)
from tritonkit.preprocessing.image import ImageRecipe, image_bytes_to_pixels

# DALI's antialiased cubic resize and PIL's bicubic differ by at most ~2 grey levels on these
# images (measured: max 0.03, mean <= 0.003 after normalizing by std ~0.27, i.e. 0.03 * 0.27 * 255
# ~ 2 levels). The bounds leave room for one more level, and the mean bound catches any shift or
# crop offset error (a one-pixel shift gives a mean difference above 0.05).
MAX_ABS = 0.05
MAX_MEAN = 0.01


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgba_image() -> Image.Image:
    pixels = np.concatenate([random_image(300, 400, seed=4), np.full((300, 400, 1), 255, np.uint8)], axis=2)
    pixels[:100, :, 3] = 0
    pixels[100:150, :, 3] = 128
    return Image.fromarray(pixels, mode="RGBA")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return encoded(Image.fromarray(random_image(300, 400, seed=7)), "JPEG", exif=exif)


PHOTO = Image.fromarray(random_image(480, 640, seed=1))
IMAGES = {
    "landscape jpeg": encoded(PHOTO, "JPEG", quality=92),
    "portrait png": encoded(Image.fromarray(random_image(333, 251, seed=2)), "PNG"),
    "square png": encoded(Image.fromarray(random_image(224, 224, seed=3)), "PNG"),
    "small png": encoded(Image.fromarray(random_image(100, 150, seed=5)), "PNG"),
    "large jpeg": encoded(Image.fromarray(random_image(2000, 3000, seed=6)), "JPEG"),
    "very wide png": encoded(Image.fromarray(random_image(20, 1000, seed=8)), "PNG"),
    "tall jpeg": encoded(Image.fromarray(random_image(1000, 250, seed=9)), "JPEG"),
    "1x1 png": encoded(Image.fromarray(random_image(1, 1, seed=10)), "PNG"),
    "grayscale jpeg": encoded(PHOTO.convert("L"), "JPEG"),
    "grayscale png": encoded(PHOTO.convert("L"), "PNG"),
    "palette png": encoded(PHOTO.convert("P"), "PNG"),
    "cmyk jpeg": encoded(PHOTO.convert("CMYK"), "JPEG"),
    "rgba png": encoded(rgba_image(), "PNG"),
    "exif-rotated jpeg": exif_rotated_jpeg(),
    "webp": encoded(PHOTO, "WEBP", lossless=True),
    "bmp": encoded(PHOTO, "BMP"),
    "tiff": encoded(PHOTO, "TIFF"),
    "jpeg with trailing zeros": encoded(PHOTO, "JPEG") + bytes(1000),
}


@pytest.fixture(scope="module", params=EMBEDDING_FAMILIES)
def processor(request, tiny_model_dir):
    """Each embedding family's own image processor (CLIP: shortest edge + crop; SigLIP: a fixed
    resize, no crop), at the 224 pixels of the families' base checkpoints."""
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(str(tiny_model_dir(request.param)))
    if image_processor.size.get("height"):
        image_processor.size = {"height": 224, "width": 224}
    return image_processor


@pytest.fixture(scope="module")
def recipe(processor):
    return ImageRecipe.from_processor(processor)


@pytest.fixture(scope="module")
def dali_outputs(recipe):
    return dict(zip(IMAGES, image_pixels(recipe, list(IMAGES.values()))))


def report(name: str, ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    difference = np.abs(ours - reference)
    print(f"{name}: max abs {difference.max():.4f}, mean {difference.mean():.5f}")
    return float(difference.max()), float(difference.mean())


@pytest.mark.parametrize("name", list(IMAGES))
def test_dali_image_pipeline_matches_the_image_processor(name, dali_outputs, processor):
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(IMAGES[name])))  # EXIF orientation is applied
    reference = processor(image, return_tensors="np")["pixel_values"][0]
    largest, mean = report(name, dali_outputs[name], reference)
    assert dali_outputs[name].shape == (3, 224, 224)
    assert largest < MAX_ABS and mean < MAX_MEAN


@pytest.mark.parametrize("mode", ["fit", "pad"])
def test_dali_resize_modes_match_the_pil_engine(mode, recipe):
    moded = recipe.with_options(resize_mode=mode)
    files = [IMAGES[n] for n in ("landscape jpeg", "portrait png", "very wide png", "1x1 png")]
    for name, ours in zip(["landscape", "portrait", "very wide", "1x1"], image_pixels(moded, files)):
        reference = image_bytes_to_pixels(files[["landscape", "portrait", "very wide", "1x1"].index(name)], moded)
        largest, mean = report(f"{mode} {name}", ours, reference)
        assert largest < MAX_ABS and mean < MAX_MEAN


def test_pad_mode_letterboxes_with_the_mean_colour(recipe):
    (pixels,) = image_pixels(recipe.with_options(resize_mode="pad"), [IMAGES["very wide png"]])
    # 20x1000 fits as 4x224 rows in the middle; the rest is the mean colour, truncated to whole
    # grey levels (DALI fills uint8 images), so it normalizes to within one level of 0.
    one_level = 1 / (255 * 0.26)
    assert np.abs(pixels[:, :100]).max() < one_level and np.abs(pixels[:, -100:]).max() < one_level
    assert np.abs(pixels[:, 110:114]).max() > 0.1


def test_exif_orientation_can_be_ignored(recipe, processor):
    (pixels,) = image_pixels(recipe.with_options(exif_orientation=False), [IMAGES["exif-rotated jpeg"]])
    reference = processor(Image.open(io.BytesIO(IMAGES["exif-rotated jpeg"])), return_tensors="np")["pixel_values"][0]
    largest, mean = report("exif ignored", pixels, reference)
    assert largest < MAX_ABS and mean < MAX_MEAN


def test_runner_fails_only_the_rows_dali_cannot_decode(recipe):
    good = np.frombuffer(IMAGES["landscape jpeg"], dtype=np.uint8)
    runner = DaliRunner(serialize(image_graph(recipe, "IMAGE"), "cpu", 8), 8)
    results = runner.run(
        {"IMAGE": [good, good[: len(good) // 3], good, np.frombuffer(b"GIF89a" + bytes(64), np.uint8)]}
    )
    assert [isinstance(r, RowFailed) for r in results] == [False, True, False, True]
    np.testing.assert_array_equal(results[0][0], results[2][0])
    assert runner.run({"IMAGE": [good]})[0][0].shape == (3, 224, 224)  # usable after the failure
    assert [r[0].shape for r in runner.run_all({"IMAGE": [good, good]})] == [(3, 224, 224)] * 2
    with pytest.raises(RowFailed):  # run_all: for callers whose inputs are known good
        runner.run_all({"IMAGE": [good, good[: len(good) // 3]]})


def direct_pipeline_outputs(graph, name: str, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Build the graph in this process (no serialization) and run it."""
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=len(rows), num_threads=1, device_id=None)
    with pipe:
        pipe.set_outputs(*graph("cpu"))
    pipe.build()
    pipe.feed_input(name, rows)
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(rows))]


def test_serialized_image_pipeline_runs_like_the_in_process_one(recipe, tmp_path):
    path = tmp_path / "model.dali"
    path.write_bytes(serialize(image_graph(recipe, "IMAGE"), "cpu", 4))
    rows = [np.frombuffer(IMAGES[n], dtype=np.uint8) for n in ("landscape jpeg", "portrait png", "cmyk jpeg")]
    served = DaliRunner(path.read_bytes(), 4).run({"IMAGE": rows})
    for (ours,), direct in zip(served, direct_pipeline_outputs(image_graph(recipe, "IMAGE"), "IMAGE", rows)):
        np.testing.assert_array_equal(ours, direct)


def test_serialized_log_mel_pipeline_runs_like_the_in_process_one(tmp_path):
    rng = np.random.default_rng(0)
    windows = [rng.normal(0, 0.1, n).astype(np.float32) for n in (16000, 480000, 100)]
    graph = log_mel_graph(80, "WINDOW_SAMPLES")
    path = tmp_path / "model.dali"
    path.write_bytes(serialize(graph, "cpu", 4))
    served = DaliRunner(path.read_bytes(), 4).run({"WINDOW_SAMPLES": windows})
    for (ours,), direct in zip(served, direct_pipeline_outputs(graph, "WINDOW_SAMPLES", windows)):
        np.testing.assert_array_equal(ours, direct)


@pytest.mark.parametrize("graph_name", ["image", "log_mel"])
def test_gpu_pipelines_serialize_without_a_gpu_and_parse(graph_name, recipe):
    """Without a GPU, DALI parses a GPU file and stops only at the missing CUDA driver; a damaged
    file fails at parsing. The same graph with CPU operators is run in the tests above."""
    from nvidia.dali.pipeline import Pipeline

    graph = image_graph(recipe, "IMAGE") if graph_name == "image" else log_mel_graph(80, "WINDOW_SAMPLES")
    gpu, cpu = serialize(graph, "gpu", 8), serialize(graph, "cpu", 8)
    assert gpu != cpu  # the GPU file places operators on the GPU

    def load(data: bytes):
        return Pipeline.deserialize(serialized_pipeline=data, batch_size=8, num_threads=1, device_id=None)

    with pytest.raises(RuntimeError, match="Error parsing serialized pipeline"):
        load(gpu[: len(gpu) // 2])
    if not has_gpu():
        with pytest.raises(RuntimeError, match="requires a CUDA-capable GPU"):
            load(gpu)


@pytest.mark.gpu
def test_gpu_image_pipeline_matches_the_cpu_pipeline(recipe):
    """Never run here (no GPU): the GPU file against the CPU file on the same images."""
    from nvidia.dali.pipeline import Pipeline

    rows = [np.frombuffer(IMAGES[n], dtype=np.uint8) for n in ("landscape jpeg", "portrait png", "grayscale jpeg")]
    pipe = Pipeline.deserialize(
        serialized_pipeline=serialize(image_graph(recipe, "IMAGE"), "gpu", 4), batch_size=4, num_threads=1, device_id=0
    )
    pipe.build()
    pipe.feed_input("IMAGE", rows)
    (out,) = pipe.run()
    gpu = [np.array(out.as_cpu()[i]) for i in range(len(rows))]
    for ours, cpu in zip(gpu, image_pixels(recipe, [r.tobytes() for r in rows])):
        assert np.abs(ours - cpu).max() < MAX_ABS


# -- log-mel ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["speech", "silence", "clipping noise", "8 kHz", "44.1 kHz stereo"])
def test_dali_log_mel_matches_whisper_feature_extractor(case, speech_files):
    from transformers import WhisperFeatureExtractor

    from tests.test_whisper import audio_case

    samples = audio_case(case, speech_files)
    extractor = WhisperFeatureExtractor(feature_size=80)
    (ours,) = log_mel_features(80, [samples])
    reference = extractor(samples, sampling_rate=16000, return_tensors="np")["input_features"][0]
    largest, _mean = report(case, ours, reference)
    # float32 FFT in DALI vs torch's float32 STFT: measured max 6e-5 on these inputs.
    assert largest < 2e-4
