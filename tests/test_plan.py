"""`tritonkit plan` against a case computed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tritonkit.capacity import ARENA_FACTOR, graph_memory, make_plan
from tritonkit.errors import InputError
from tritonkit.families import family_names
from tritonkit.server import free_port
from tritonkit.triton_config import Batching, Tensor, model_config, write_config


def hand_graph(path: Path) -> Path:
    """X[batch,4] -MatMul W1[4,8]-> Y[batch,8] -Relu-> Z[batch,8] -MatMul W2[8,2]-> OUT[batch,2], float32.

    Weights: (32 + 16) floats = 192 bytes. At batch 16: X 256 B, Y 512 B, Z 512 B, OUT 128 B.
    Alive together: X+Y = 768, then Y+Z = 1024 (X freed), then Z+OUT = 640: peak 1024 bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(np.ones((4, 8), np.float32), "W1")
    w2 = numpy_helper.from_array(np.ones((8, 2), np.float32), "W2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W1"], ["Y"]),
            helper.make_node("Relu", ["Y"], ["Z"]),
            helper.make_node("MatMul", ["Z", "W2"], ["OUT"]),
        ],
        "hand",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("OUT", TensorProto.FLOAT, ["batch", 2])],
        initializer=[w1, w2],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_graph_memory_is_the_hand_computed_peak(tmp_path):
    memory = graph_memory(hand_graph(tmp_path / "hand.onnx"), {"batch": 16})
    assert (memory.weight_bytes, memory.workspace_bytes, memory.unsized_tensors) == (192, 1024, 0)
    assert graph_memory(tmp_path / "hand.onnx", {}).assumed_dims == ("batch",)  # counted as 1, and reported
    assert graph_memory(tmp_path / "hand.onnx", {}).workspace_bytes == 64


@pytest.fixture
def hand_repository(tmp_path) -> Path:
    repo = tmp_path / "repo"
    (repo / "hand_encoder" / "1").mkdir(parents=True)
    hand_graph(repo / "hand_encoder" / "1" / "model.onnx")
    (repo / "hand_encoder" / "1" / "model.py").write_text("# not counted\n")
    (repo / "hand_encoder" / "1" / "vocab.txt").write_bytes(b"x" * 1000)  # a loaded file: counted at its size
    config = model_config(
        "hand_encoder",
        [Tensor("X", "float32", (4,))],
        [Tensor("OUT", "float32", (2,))],
        Batching(max_batch_size=16, preferred_batch_sizes=(16,), max_queue_delay_us=100, instances=3),
    )
    write_config(config, repo / "hand_encoder")
    return repo


def bench_result(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "model": "hand",
                "levels": [
                    {"concurrency": 1, "throughput": 50.0, "p99_ms": 80.0, "errors": 0},
                    {"concurrency": 8, "throughput": 80.0, "p99_ms": 200.0, "errors": 0},
                    {"concurrency": 32, "throughput": 95.0, "p99_ms": 900.0, "errors": 3},  # errors: never counted
                ],
            }
        )
    )
    return path


def test_plan_of_a_hand_computed_repository(hand_repository, tmp_path):
    mib = 2**20
    plan = make_plan(
        hand_repository,
        qps=300,
        bench=bench_result(tmp_path / "bench.json"),
        gpu_memory_gb=1,
        gpu_hour_price=2.5,
        utilization=0.7,
        overhead_mb=100,
    )
    (model,) = plan.models
    # a CPU model: the arena at ARENA_FACTOR x the ideal peak, plus a full batch of X and OUT (16 x 6 floats)
    assert (model.instances, model.weight_bytes, model.workspace_bytes) == (3, 192 + 1000, int(ARENA_FACTOR * 1024))
    assert model.buffer_bytes == 16 * (4 + 2) * 4
    assert model.bytes_per_instance == 192 + 1000 + int(ARENA_FACTOR * 1024) + 100 * mib + 384
    assert plan.replica_bytes == 3 * model.bytes_per_instance
    assert plan.instances_per_gpu == {"hand_encoder": 2**30 // model.bytes_per_instance} == {"hand_encoder": 10}
    assert plan.gpus_per_replica == 1
    assert plan.throughput.requests_per_s == 80.0  # the best error-free level
    assert plan.replicas == 6  # ceil(300 / (80 * 0.7)) = ceil(5.36)
    assert plan.monthly_cost == pytest.approx(6 * 1 * 2.5 * 730)  # 10,950
    # a latency bound picks the level within it: ceil(300 / (50 * 0.7)) = ceil(8.57)
    assert make_plan(hand_repository, qps=300, bench=tmp_path / "bench.json", max_p99_ms=100).replicas == 9
    # a replica larger than one GPU needs several: 3 x (100 MiB + ...) on 0.25 GB GPUs
    assert make_plan(hand_repository, gpu_memory_gb=0.25, overhead_mb=100).gpus_per_replica == 2


def test_plan_command_prints_a_table_and_writes_json(hand_repository, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "plan",
            str(hand_repository),
            "--qps",
            "300",
            "--bench",
            str(bench_result(tmp_path / "bench.json")),
            "--gpu-hour-price",
            "2.5",
            "--overhead-mb",
            "100",
            "--json",
            str(tmp_path / "plan.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "hand_encoder" in result.stdout and "replicas for 300 req/s at 70% utilisation: 6" in result.stdout
    assert "= 10,950.00" in result.stdout
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["replicas"] == 6 and data["models"][0]["workspace_bytes"] == int(ARENA_FACTOR * 1024)


def test_plan_rejects_bad_requests_clearly(hand_repository, tmp_path):
    with pytest.raises(InputError, match="--qps needs --bench"):
        make_plan(hand_repository, qps=10)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="not a `tritonkit bench --json` result"):
        make_plan(hand_repository, qps=10, bench=tmp_path / "bad.json")
    with pytest.raises(InputError, match="no error-free level with p99 <= 10 ms"):
        make_plan(hand_repository, qps=10, bench=bench_result(tmp_path / "b.json"), max_p99_ms=10)


@pytest.mark.parametrize("family", family_names())
def test_every_family_repository_is_planned_from_its_graphs(family, family_repository):
    from tritonkit.capacity import model_plans

    repository = family_repository(family)
    plans = {p.name: p for p in model_plans(repository)}
    encoders = [p for p in plans.values() if p.graphs]
    assert encoders, f"{family}: no ONNX graph was sized"
    for plan in encoders:
        assert plan.weight_bytes >= sum(g.weight_bytes for g in plan.graphs) > 0
        assert plan.workspace_bytes > 0 and plan.instances >= 1


def test_whisper_decoders_cross_kv_is_sized_for_a_window_per_row(whisper_repository):
    """Beam search shares one cross-KV row per window, but greedy rows are each a window: the
    step graph's `windows` dim is planned at the batch's rows, not left at 1."""
    from tritonkit.capacity import model_plans

    def decoder(dims=None):
        return next(p for p in model_plans(whisper_repository, dims=dims) if p.name == "whisper_decoder")

    planned = decoder()
    step = next(g for g in planned.graphs if g.file == "step.onnx")
    assert "windows" not in step.assumed_dims
    assert decoder({"windows": 1}).workspace_bytes < planned.workspace_bytes


@pytest.mark.server
def test_plan_measures_a_served_repository_through_its_metrics(clip_repository, clip_server, tmp_path):
    """`--measure host:port` reads each stub's tritonkit_resident_bytes from Triton's /metrics:
    the PSS figures /proc gives on the server's machine, every model and tritonserver compared."""
    import tritonclient.grpc as grpcclient

    from tests.conftest import encode_image, random_image
    from tritonkit.memory import resident_by_model

    client = grpcclient.InferenceServerClient(clip_server.grpc_url)
    for size in (64, 300):  # every stub serves (and refreshes its gauge) at least once
        image = np.frombuffer(encode_image(random_image(size, size), "JPEG"), np.uint8)[None, :]
        tensor = grpcclient.InferInput("IMAGE", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        client.infer("clip_image", [tensor])
        text = np.array([[b"a photo of a cat"]], dtype=object)
        tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(text)
        client.infer("clip_text", [tensor])
    time.sleep(1.1)  # gauges refresh at most once a second
    client.infer("clip_text", [tensor])
    on_the_machine = resident_by_model(clip_server.process.pid, within_server=False)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "plan",
            str(clip_repository),
            "--measure",
            f"127.0.0.1:{clip_server.metrics_port}",
            "--json",
            str(tmp_path / "plan.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    measured = {c["model"]: c["measured_bytes"] for c in json.loads((tmp_path / "plan.json").read_text())["measured"]}
    assert set(measured) == set(on_the_machine)
    for model, size in measured.items():
        assert abs(size - on_the_machine[model]) <= 0.15 * on_the_machine[model] + 8 * 2**20, model


def test_plan_measure_names_a_bad_source(hand_repository, tmp_path):
    from tritonkit.capacity import measured_memory

    with pytest.raises(InputError, match="cannot read"):
        measured_memory(f"127.0.0.1:{free_port()}")
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(InputError, match=r"not a scripts/soak\.py --json report"):
        measured_memory(str(tmp_path / "report.json"))
    (tmp_path / "metrics.txt").write_text("nv_inference_count 3\n")
    with pytest.raises(InputError, match="no tritonkit_resident_bytes"):
        measured_memory(str(tmp_path / "metrics.txt"))
