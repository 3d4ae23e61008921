"""A failed batch harms neither the server nor its batch mates (a real tritonserver, over gRPC).

The test model (tests/triton_models/faulty.py) is built on `BatchedModel`, as every tritonkit
Python-backend model is, and fails its whole batch when one row is culpable."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import start_server
from tritonkit.errors import MAX_MESSAGE_CHARS
from tritonkit.triton_config import Batching, Tensor, model_config, write_config

pytestmark = pytest.mark.server
MODEL = "faulty"
MAX_REQUEST_BYTES = 4096


def write_faulty_repository(root: Path) -> Path:
    config = model_config(
        MODEL,
        (Tensor("VALUE", "int32", (1,)), Tensor("NOTE", "string", (1,), optional=True)),
        (Tensor("DOUBLED", "int32", (1,)),),
        # a long queue delay so that concurrent requests meet in one batch
        Batching(max_batch_size=16, preferred_batch_sizes=(16,), max_queue_delay_us=200_000),
        {"max_request_bytes": str(MAX_REQUEST_BYTES)},
    )
    (root / MODEL / "1").mkdir(parents=True)
    write_config(config, root / MODEL)
    shutil.copy(Path(__file__).parent / "triton_models" / "faulty.py", root / MODEL / "1" / "model.py")
    return root


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory):
    server = start_server(write_faulty_repository(tmp_path_factory.mktemp("faulty_repository")))
    yield server
    server.stop()


def infer(url: str, value: int, note: bytes | None = None):
    """DOUBLED, or the error message."""
    inputs = [grpcclient.InferInput("VALUE", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([[value]], dtype=np.int32))
    if note is not None:
        inputs.append(grpcclient.InferInput("NOTE", [1, 1], "BYTES"))
        inputs[1].set_data_from_numpy(np.array([[note]], dtype=object))
    with grpcclient.InferenceServerClient(url) as client:
        try:
            return int(client.infer(MODEL, inputs, client_timeout=60).as_numpy("DOUBLED")[0, 0])
        except InferenceServerException as exc:
            return exc.message()


def concurrently(url: str, values: list[int]) -> list:
    results: list = [None] * len(values)
    start = threading.Barrier(len(values))

    def call(i):
        start.wait()
        results[i] = infer(url, values[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(values))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def executed_batch_sizes(url: str) -> set[int]:
    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]) for b in stats.get("batch_stats", [])}


@pytest.mark.parametrize("size", [2, 3, 8, 16])
@pytest.mark.parametrize("poison", [-1, -2, -3])
def test_a_culpable_request_fails_alone_when_its_batch_fails(faulty_server, size, poison):
    values = [10 + i for i in range(size)]
    culprit = size // 2
    values[culprit] = poison
    results = concurrently(faulty_server.grpc_url, values)
    for i, (value, result) in enumerate(zip(values, results)):
        if i == culprit:
            assert isinstance(result, str), result
            assert {-1: "poison row in a batch of 1", -2: "invalid literal", -3: "VALUE: -3 is refused"}[
                poison
            ] in result
        else:
            assert result == 2 * value, f"batch mate {i} of {size}: {result}"
    assert faulty_server.is_ready()
    assert faulty_server.process.poll() is None


def test_batches_of_every_size_formed_and_the_server_survived(faulty_server):
    for _ in range(3):
        results = concurrently(faulty_server.grpc_url, [-1, *range(1, 12), -2, -3, 5, 6])
        assert results[1:12] == [2 * v for v in range(1, 12)] and results[-2:] == [10, 12]
    sizes = executed_batch_sizes(faulty_server.grpc_url)
    assert max(sizes) >= 8, sizes  # failed batches of many requests were really executed together
    assert infer(faulty_server.grpc_url, 21) == 42


def test_a_request_over_the_byte_limit_fails_alone_with_the_limit_named(faulty_server):
    message = infer(faulty_server.grpc_url, 1, note=b"x" * (MAX_REQUEST_BYTES + 1))
    assert message.endswith(
        f"request: {MAX_REQUEST_BYTES + 1} bytes of input exceed the {MAX_REQUEST_BYTES} byte limit "
        "(max_request_bytes; rebuild with --max-request-bytes to change it)"
    ), message
    assert infer(faulty_server.grpc_url, 1, note=b"x" * 100) == 2


def test_an_error_message_is_cut_to_fit_grpc_trailers(faulty_server):
    results = concurrently(faulty_server.grpc_url, [-4, 3])
    assert isinstance(results[0], str) and results[0].startswith(f"{MODEL}: xxx"), results[0][:200]
    assert len(results[0]) <= MAX_MESSAGE_CHARS, len(results[0])
    assert results[1] == 6
