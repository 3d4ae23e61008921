"""`tritonkit bench` against a real tritonserver."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import encode_image, random_image

pytestmark = pytest.mark.server


def run_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "tritonkit.cli", *args], capture_output=True, text=True, timeout=600)


def test_bench_reports_throughput_latency_and_the_server_breakdown(clip_server, tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(encode_image(random_image(240 + 10 * i, 320, seed=60 + i), "JPEG"))
    result = run_cli(
        "bench",
        "clip_image",
        *[a for i in range(3) for a in ("-i", str(tmp_path / f"{i}.jpg"))],
        "--concurrency",
        "1,4",
        "--requests",
        "12",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
        "--url",
        clip_server.grpc_url,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["requests"] == 12 and level["errors"] == 0 and level["throughput"] > 0
        assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"]
        assert 0 < level["client_cpu_share"] <= 1
        encoder = level["models"]["clip_image_encoder"]
        assert (
            encoder["requests"] == 12 and encoder["compute_infer_ms"] > 0 and sum(encoder["batch_sizes"].values()) >= 1
        )
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p99 ms" in result.stderr + result.stdout


def test_bench_counts_failed_requests_and_shows_the_first_error(clip_server, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    result = run_cli(
        "bench",
        "clip_image",
        "-i",
        str(tmp_path / "bad.jpg"),
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--json",
        str(tmp_path / "r.json"),
        "--url",
        clip_server.grpc_url,
    )
    assert result.returncode == 0, result.stderr
    (level,) = json.loads((tmp_path / "r.json").read_text())["levels"]
    assert level["errors"] == 4 and "IMAGE: not a decodable image" in level["first_error"]


def test_bench_sends_text_to_text_models(clip_server, tmp_path):
    result = run_cli(
        "bench",
        "clip_text",
        "--text",
        "a cat",
        "--text",
        "a dog",
        "--concurrency",
        "2",
        "--requests",
        "6",
        "--json",
        str(tmp_path / "r.json"),
        "--url",
        clip_server.grpc_url,
    )
    assert result.returncode == 0, result.stderr
    (level,) = json.loads((tmp_path / "r.json").read_text())["levels"]
    assert level["errors"] == 0 and level["models"]["clip_text_tokenizer"]["requests"] == 6


def test_perf_analyzer_option_fails_clearly_when_it_is_not_installed(clip_server, tmp_path):
    import shutil

    if shutil.which("perf_analyzer"):
        pytest.skip("perf_analyzer is installed")
    (tmp_path / "a.jpg").write_bytes(encode_image(random_image(100, 100), "JPEG"))
    result = run_cli(
        "bench", "clip_image", "-i", str(tmp_path / "a.jpg"), "--perf-analyzer", "--url", clip_server.grpc_url
    )
    assert result.returncode == 2 and "no perf_analyzer on PATH" in result.stderr


@pytest.fixture(scope="module")
def cached_clip_server(clip_repository):
    from tests.conftest import start_server

    server = start_server(clip_repository, response_cache_bytes=16 * 1024 * 1024)
    yield server
    server.stop()


def test_bench_makes_inputs_unique_so_the_response_cache_never_answers_unless_allowed(cached_clip_server, tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode_image(random_image(120, 90, seed=70), "JPEG"))
    args = ["bench", "clip_image", "-i", str(tmp_path / "a.jpg"), "--concurrency", "2", "--requests", "8"]
    args += ["--url", cached_clip_server.grpc_url, "--json"]
    # two levels, and the same command run twice: no level repeats the inputs of one before it
    several = [*args[:4], "--concurrency", "1,2", *args[6:]]
    for run in ("first", "again"):
        measured = run_cli(*several, str(tmp_path / f"{run}.json"))
        assert measured.returncode == 0, measured.stderr
        levels = json.loads((tmp_path / f"{run}.json").read_text())["levels"]
        assert len(levels) == 2
        for level in levels:
            ensemble, encoder = level["models"]["clip_image"], level["models"]["clip_image_encoder"]
            assert level["errors"] == 0 and encoder["requests"] == 8, level
            assert ensemble["cache_hits"] == 0 and encoder["cache_hits"] == 0, level
        assert "response cache answered" not in measured.stdout + measured.stderr
    cached = run_cli(*args, str(tmp_path / "cached.json"), "--allow-cache")
    assert cached.returncode == 0, cached.stderr
    (level,) = json.loads((tmp_path / "cached.json").read_text())["levels"]
    hits = level["models"]["clip_image"]["cache_hits"] + level["models"]["clip_image_encoder"]["cache_hits"]
    assert hits >= 8 - 2  # all but the first request of each of the 2 workers
    assert "Triton's response cache answered" in cached.stdout + cached.stderr
    tables = [line for line in (cached.stdout + cached.stderr).splitlines() if set(line) & set("│┃━─")]
    assert tables and all(len(line) <= 80 for line in tables), tables  # the tables fit a terminal
