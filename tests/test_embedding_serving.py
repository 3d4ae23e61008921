"""CLIP and its variants (every registered embedding family: CLIP, SigLIP) served end to end on a
real tritonserver, checked against transformers over gRPC. The family list comes from the registry."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.conftest import EMBEDDING_FAMILIES, encode_image, random_image
from tritonkit.client import TritonkitClient, executed_batch_sizes, pack_byte_rows
from tritonkit.errors import InferenceError

pytestmark = pytest.mark.server

MIN_COSINE = 0.9999


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float) -> None:
    assert actual.shape == expected.shape
    cosine = (actual * expected).sum(-1) / (np.linalg.norm(actual, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosine.min() >= MIN_COSINE, f"cosine {cosine.min()}"
    assert np.abs(actual - expected).max() <= atol, f"max abs error {np.abs(actual - expected).max()}"


def transformers_images(loaded_pair, files: list[bytes]) -> np.ndarray:
    spec, loaded = loaded_pair
    return spec.reference_image_embeds(loaded, [Image.open(io.BytesIO(f)) for f in files])


def dali_images(loaded_pair, files: list[bytes]) -> np.ndarray:
    """The model's image features of the pixels that the DALI pipeline computes in this process."""
    import torch

    from tritonkit.families.clip import projected
    from tritonkit.preprocessing.dali import image_pixels

    spec, loaded = loaded_pair
    pixels = torch.from_numpy(image_pixels(spec.image_recipe(loaded), files))
    with torch.no_grad():
        return projected(loaded.model.get_image_features(pixel_values=pixels)).numpy()


# What each preprocessing engine's image ensemble must equal: PIL computes the image processor's
# pixels exactly; DALI computes its own (its cubic resize differs from PIL's by at most ~2 grey
# levels, see test_dali_preprocessing), so the served DALI ensemble is held to the model run on
# DALI's in-process pixels.
ENGINES = {"python": transformers_images, "dali": dali_images}


@pytest.fixture(scope="module", params=EMBEDDING_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def loaded_pair(family, embedding_servers):
    spec, loaded, _, _ = embedding_servers(family)
    return spec, loaded


@pytest.fixture(scope="module", params=list(ENGINES))
def served(request, family, embedding_servers):
    *_, server = embedding_servers(family, request.param)
    with TritonkitClient(server.grpc_url) as c:
        yield c, server, ENGINES[request.param]


@pytest.fixture(scope="module")
def client(family, embedding_servers):
    with TritonkitClient(embedding_servers(family)[3].grpc_url) as c:
        yield c


def test_image_ensemble_matches_its_reference_when_jpeg_and_png(family, served, loaded_pair):
    client, _, reference = served
    spec, _ = loaded_pair
    files = [
        encode_image(random_image(480, 640, seed=1), "JPEG"),
        encode_image(random_image(333, 251, seed=2), "PNG"),
        encode_image(random_image(224, 224, seed=3, channels=4), "PNG", mode="RGBA"),
        encode_image(random_image(90, 700, seed=4, channels=1)[..., 0], "JPEG"),
    ]
    expected = reference(loaded_pair, files)
    for file, want in zip(files, expected):  # one request each
        assert_close(
            client.embed_images([file], model=f"{family}_image"), want[None], spec.tolerance("image_encoder").max_abs
        )
    # all in one request: rows of different lengths, zero-padded
    assert_close(client.embed_images(files, model=f"{family}_image"), expected, spec.tolerance("image_encoder").max_abs)


def test_dali_ensemble_stays_close_to_transformers(family, client, loaded_pair):
    files = [encode_image(random_image(480, 640, seed=1), "JPEG"), encode_image(random_image(333, 251, seed=2), "PNG")]
    got, want = client.embed_images(files, model=f"{family}_image"), transformers_images(loaded_pair, files)
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() > 0.999, cosine


def test_image_ensemble_batches_concurrent_requests_when_many_clients(family, served, loaded_pair):
    client, server, reference = served
    spec, _ = loaded_pair
    files = [encode_image(random_image(200 + 7 * i, 260, seed=10 + i), "JPEG") for i in range(24)]
    expected = reference(loaded_pair, files)
    before = executed_batch_sizes(client.statistics(f"{family}_image_encoder"), f"{family}_image_encoder")
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(
            pool.map(lambda f: TritonkitClient(server.grpc_url).embed_images([f], model=f"{family}_image"), files)
        )
    for got, want in zip(results, expected):
        assert_close(got, want[None], spec.tolerance("image_encoder").max_abs)
    after = executed_batch_sizes(client.statistics(f"{family}_image_encoder"), f"{family}_image_encoder")
    merged = {
        size: after[size] - before.get(size, 0) for size in after if size > 1 and after[size] > before.get(size, 0)
    }
    assert merged, f"no batch larger than 1 was executed: {after}"


def test_text_ensemble_matches_transformers_when_short_empty_and_overlong(family, client, loaded_pair):
    spec, loaded = loaded_pair
    texts = ["a photo of a cat", "", "a very long caption " * 40, "emoji 🐈 and accents: café"]
    expected = spec.reference_text_embeds(loaded, texts)
    assert_close(client.embed_texts(texts, model=f"{family}_text"), expected, spec.tolerance("text_encoder").max_abs)
    for text, want in zip(texts, expected):
        assert_close(
            client.embed_texts([text], model=f"{family}_text"), want[None], spec.tolerance("text_encoder").max_abs
        )


def test_image_request_fails_alone_when_its_batch_mates_are_valid(family, served, loaded_pair):
    _, server, reference = served
    spec, _ = loaded_pair
    good = encode_image(random_image(300, 300, seed=5), "JPEG")
    bad_inputs = [b"not an image at all", good[: len(good) // 3], b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj"]
    expected = reference(loaded_pair, [good])

    def call(data: bytes):
        try:
            return TritonkitClient(server.grpc_url).embed_images([data], model=f"{family}_image")
        except InferenceError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, [good, *bad_inputs, good, good]))
    for result in (results[0], *results[-2:]):
        assert isinstance(result, np.ndarray)
        assert_close(result, expected, spec.tolerance("image_encoder").max_abs)
    for result in results[1:4]:
        assert isinstance(result, InferenceError)
        assert "IMAGE: not decodable" in str(result) or "IMAGE: not a decodable image" in str(result), result


def test_image_request_is_rejected_when_empty(family, served):
    client, _, _ = served
    with pytest.raises(InferenceError, match="IMAGE: empty input"):
        client.infer(f"{family}_image", {"IMAGE": np.zeros((1, 1), dtype=np.uint8)[:, :0]})


def test_text_request_is_rejected_when_not_utf8(family, client):
    with pytest.raises(InferenceError, match="TEXT: not valid UTF-8"):
        client.infer(f"{family}_text", {"TEXT": np.array([[b"\xff\xfe bad"]], dtype=object)})


def test_byte_rows_are_zero_padded_when_lengths_differ():
    rows = pack_byte_rows([b"abc", b"z"])
    assert rows.dtype == np.uint8 and rows.shape == (2, 3)
    assert rows[1].tobytes() == b"z\x00\x00"


def cache_hits(client: TritonkitClient, model: str) -> int:
    for entry in client.statistics(model).get("model_stats", []):
        if entry["name"] == model:
            return int(entry["inference_stats"].get("cache_hit", {}).get("count", 0))
    return 0


def test_repeated_inputs_are_answered_from_the_response_cache(family, embedding_servers):
    from tests.conftest import start_server

    server = start_server(embedding_servers(family)[2], response_cache_bytes=16 * 1024 * 1024)
    try:
        with TritonkitClient(server.grpc_url) as client:
            image = encode_image(random_image(200, 300, seed=42), "JPEG")
            first = client.embed_images([image], model=f"{family}_image")
            again = client.embed_images([image], model=f"{family}_image")
            texts = [client.embed_texts(["a cached caption"], model=f"{family}_text") for _ in range(3)]
            np.testing.assert_array_equal(first, again)
            np.testing.assert_array_equal(texts[0], texts[2])
            assert cache_hits(client, f"{family}_image") == 1
            assert cache_hits(client, f"{family}_text") == 2
            # the composing models ran once per distinct input
            encoder = executed_batch_sizes(client.statistics(f"{family}_image_encoder"), f"{family}_image_encoder")
            assert sum(encoder.values()) == 1
    finally:
        server.stop()


def test_a_one_megabyte_text_is_truncated_to_the_model_length(family, client, loaded_pair):
    spec, loaded = loaded_pair
    text = "word " * 200_000
    got = client.embed_texts([text], model=f"{family}_text")
    want = spec.reference_text_embeds(loaded, [text])
    assert np.abs(got - want).max() <= spec.tolerance("text_encoder").max_abs
