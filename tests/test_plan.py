"""`tritonkit plan` against a case computed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tritonkit.errors import InputError
from tritonkit.families import family_names
from tritonkit.plan import graph_memory, make_plan
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
    assert (model.instances, model.weight_bytes, model.workspace_bytes) == (3, 192 + 1000, 1024)
    assert model.bytes_per_instance == 192 + 1000 + 1024 + 100 * mib
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
    assert data["replicas"] == 6 and data["models"][0]["workspace_bytes"] == 1024


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
    from tritonkit.plan import model_plans

    repository = family_repository(family)
    plans = {p.name: p for p in model_plans(repository)}
    encoders = [p for p in plans.values() if p.graphs]
    assert encoders, f"{family}: no ONNX graph was sized"
    for plan in encoders:
        assert plan.weight_bytes >= sum(g.weight_bytes for g in plan.graphs) > 0
        assert plan.workspace_bytes > 0 and plan.instances >= 1
