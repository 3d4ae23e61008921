"""CLIP served end to end on a real tritonserver, checked against transformers over gRPC."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode_image, random_image
from tritonkit.client import TritonkitClient, executed_batch_sizes, pack_byte_rows
from tritonkit.errors import InferenceError

pytestmark = pytest.mark.server

MIN_COSINE = 0.9999


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float) -> None:
    assert actual.shape == expected.shape
    cosine = (actual * expected).sum(-1) / (np.linalg.norm(actual, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosine.min() >= MIN_COSINE, f"cosine {cosine.min()}"
    assert np.abs(actual - expected).max() <= atol, f"max abs error {np.abs(actual - expected).max()}"


def reference_images(clip_loaded, files: list[bytes]) -> np.ndarray:
    spec, loaded = clip_loaded
    return spec.reference_image_embeds(loaded, [Image.open(io.BytesIO(f)) for f in files])


@pytest.fixture(scope="module")
def client(clip_server):
    with TritonkitClient(clip_server.grpc_url) as c:
        yield c


def test_image_ensemble_matches_transformers_when_jpeg_and_png(client, clip_loaded):
    spec, _ = clip_loaded
    files = [
        encode_image(random_image(480, 640, seed=1), "JPEG"),
        encode_image(random_image(333, 251, seed=2), "PNG"),
        encode_image(random_image(224, 224, seed=3, channels=4), "PNG", mode="RGBA"),
        encode_image(random_image(90, 700, seed=4, channels=1)[..., 0], "JPEG"),
    ]
    expected = reference_images(clip_loaded, files)
    for file, want in zip(files, expected):  # one request each
        assert_close(client.embed_images([file]), want[None], spec.tolerance.max_abs)
    # all in one request: rows of different lengths, zero-padded
    assert_close(client.embed_images(files), expected, spec.tolerance.max_abs)


def test_image_ensemble_batches_concurrent_requests_when_many_clients(client, clip_server, clip_loaded):
    spec, _ = clip_loaded
    files = [encode_image(random_image(200 + 7 * i, 260, seed=10 + i), "JPEG") for i in range(24)]
    expected = reference_images(clip_loaded, files)
    before = executed_batch_sizes(client.statistics("clip_image_encoder"), "clip_image_encoder")
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda f: TritonkitClient(clip_server.grpc_url).embed_images([f]), files))
    for got, want in zip(results, expected):
        assert_close(got, want[None], spec.tolerance.max_abs)
    after = executed_batch_sizes(client.statistics("clip_image_encoder"), "clip_image_encoder")
    merged = {size: after[size] - before.get(size, 0) for size in after if size > 1 and after[size] > before.get(size, 0)}
    assert merged, f"no batch larger than 1 was executed: {after}"


def test_text_ensemble_matches_transformers_when_short_empty_and_overlong(client, clip_loaded):
    spec, loaded = clip_loaded
    texts = ["a photo of a cat", "", "a very long caption " * 40, "emoji 🐈 and accents: café"]
    expected = spec.reference_text_embeds(loaded, texts)
    assert_close(client.embed_texts(texts), expected, spec.tolerance.max_abs)
    for text, want in zip(texts, expected):
        assert_close(client.embed_texts([text]), want[None], spec.tolerance.max_abs)


def test_image_request_fails_alone_when_its_batch_mates_are_valid(client, clip_server, clip_loaded):
    spec, _ = clip_loaded
    good = encode_image(random_image(300, 300, seed=5), "JPEG")
    bad_inputs = [b"not an image at all", good[: len(good) // 3], b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj"]
    expected = reference_images(clip_loaded, [good])

    def call(data: bytes):
        try:
            return TritonkitClient(clip_server.grpc_url).embed_images([data])
        except InferenceError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, [good, *bad_inputs, good, good]))
    for result in (results[0], *results[-2:]):
        assert isinstance(result, np.ndarray)
        assert_close(result, expected, spec.tolerance.max_abs)
    for result in results[1:4]:
        assert isinstance(result, InferenceError)
        assert "IMAGE: not a decodable image" in str(result)


def test_image_request_is_rejected_when_empty(client):
    with pytest.raises(InferenceError, match="IMAGE: empty input"):
        client.infer("clip_image", {"IMAGE": np.zeros((1, 1), dtype=np.uint8)[:, :0]})


def test_text_request_is_rejected_when_not_utf8(client):
    with pytest.raises(InferenceError, match="TEXT: not valid UTF-8"):
        client.infer("clip_text", {"TEXT": np.array([[b"\xff\xfe bad"]], dtype=object)})


def test_byte_rows_are_zero_padded_when_lengths_differ():
    rows = pack_byte_rows([b"abc", b"z"])
    assert rows.dtype == np.uint8 and rows.shape == (2, 3)
    assert rows[1].tobytes() == b"z\x00\x00"
