"""`tritonkit tune`: every configuration of a small grid served and measured on a real
tritonserver, the best written into the repository, which then passes check and serves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import encode_image, random_image, start_server
from tritonkit.check import check_repository
from tritonkit.client import TritonkitClient
from tritonkit.errors import InputError
from tritonkit.triton_config import read_config
from tritonkit.tune import TunePoint, grid

pytestmark = pytest.mark.server


@pytest.mark.heavy  # 70 s of measured points: scripts/heavy_tests.sh
def test_tune_measures_every_point_and_writes_the_best_that_serves(clip_repository, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(clip_repository, repository)
    image = tmp_path / "photo.jpg"
    image.write_bytes(encode_image(random_image(240, 320, seed=5), "JPEG"))
    out = tmp_path / "tune"
    command = [
        sys.executable,
        "-m",
        "tritonkit.cli",
        "tune",
        str(repository),
        "clip_image",
        "-i",
        str(image),
        "--stage",
        "clip_image_encoder",
        "--instances",
        "1",
        "--max-batch-sizes",
        "4,12",
        "--queue-delays-us",
        "0",
        "--threads",
        "0,1",
        "--concurrency",
        "4",
        "--duration",
        "2",
        "--out",
        str(out),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    report = json.loads((out / "tune.json").read_text())
    assert len(report["results"]) == 4 and all(r["throughput"] > 0 for r in report["results"])
    assert (out / "tune.png").stat().st_size > 0 and "| best |" in (out / "tune.md").read_text()
    best = TunePoint(**report["best"]["point"])
    assert report["best"]["throughput"] == max(r["throughput"] for r in report["results"])
    config = read_config(repository / "clip_image_encoder")
    assert config.max_batch_size == best.max_batch_size
    assert read_config(repository / "clip_image").max_batch_size <= best.max_batch_size
    threads = config.parameters["intra_op_threads"].string_value if "intra_op_threads" in config.parameters else "0"
    assert int(threads) == best.threads
    assert check_repository(repository, "cpu").ok
    server = start_server(repository)
    try:
        with TritonkitClient(server.grpc_url) as client:
            assert client.embed_images([image.read_bytes()] * 3, model="clip_image").shape[0] == 3
    finally:
        server.stop()


def test_a_bound_nothing_meets_leaves_the_repository_unchanged(clip_repository, tmp_path):
    from tritonkit.tune import tune

    repository = tmp_path / "repo"
    shutil.copytree(clip_repository, repository)
    before = (repository / "clip_image_encoder" / "config.pbtxt").read_text()
    image = encode_image(random_image(120, 160, seed=1), "JPEG")
    stage, results, best = tune(
        repository,
        "clip_image",
        [image],
        grid([1], [4], [True], [0], [0]),
        stage="clip_image_encoder",
        p99_ms=0.001,
        concurrency=2,
        duration_s=1,
    )
    assert stage == "clip_image_encoder" and best is None and not results[0].within_bound
    assert (repository / "clip_image_encoder" / "config.pbtxt").read_text() == before


def test_bad_grids_and_names_fail_with_one_line(clip_repository, tmp_path):
    from tritonkit.tune import tune

    with pytest.raises(InputError, match="max batch sizes must be >= 1"):
        grid([1], [0], [False], [0], [0])
    with pytest.raises(InputError, match="has no model 'nope'"):
        tune(clip_repository, "nope", [b"x"], grid([1], [4], [False], [0], [0]))
