"""Reliability against a real tritonserver: soak with mixed inputs, and a killed backend stub."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import encode_image, random_image, start_server
from tritonkit.client import TritonkitClient
from tritonkit.errors import InferenceError

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent


SOAK_LABELS = {  # (family, through the gateway) -> (a valid case, an invalid case) of scripts/soak.py
    ("clip", False): ("jpeg", "1x20000 image"),
    ("whisper", False): ("speech wav", "20 KB language"),
    ("llava", False): ("temperature 1e-40", "100 KB prompt"),
    ("clip", True): ("embeddings jpeg", "embeddings 1x20000 image"),
}


# The Whisper and LLaVA soaks take 2-4 minutes each (Whisper drains its 150 s long-form files after every
# phase, and its plan gate needs full batches): scripts/heavy_tests.sh runs them, the test command runs CLIP's.
HEAVY_SOAKS = {("whisper", False), ("llava", False)}


@pytest.mark.parametrize(
    "family, gateway",
    [pytest.param(*key, marks=pytest.mark.heavy) if key in HEAVY_SOAKS else key for key in sorted(SOAK_LABELS)],
    ids=lambda v: {True: "gateway", False: "grpc"}.get(v, v),
)
def test_soak_with_mixed_valid_and_invalid_requests(family, gateway, request, tmp_path):
    """The CI-length soak (30-60 s at concurrency 16); scripts/soak.py defaults to 10 minutes.
    Through the gateway: every valid HTTP request a 200, every invalid one a 4xx of its own."""
    repository = request.getfixturevalue(f"{family}_repository")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--family",
            family,
            "--repository",
            str(repository),
            "--duration",
            "30" if gateway else "45" if family == "llava" else "60",
            "--json",
            str(tmp_path / "soak.json"),
            *(["--gateway"] if gateway else []),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((tmp_path / "soak.json").read_text())
    assert result.returncode == 0, report["violations"]
    counts = report["counts"]
    assert all(c["sent"] > 0 for c in counts.values())
    valid, invalid = SOAK_LABELS[family, gateway]
    assert counts[valid]["ok"] == counts[valid]["sent"] and counts[invalid]["error"] == counts[invalid]["sent"]
    assert report["timeouts"] == 0 and report["server_alive"] and report["unexpected_total"] == 0
    if not gateway:  # what the soak measured is what `tritonkit plan` predicts, model by model
        check_plan_against(repository, tmp_path / "soak.json", tmp_path / "plan.json")


# The gate on `tritonkit plan --measure` after a CI soak (served with the default allocator, which
# the stage figures were measured under): the whole repository and every model within 20%. Each
# process is charged its share of the pages the server's own processes map
# (`tritonkit.memory.group_resident_bytes`), so this test's process and other servers, which map the
# same libraries, no longer make the small stubs look smaller than they are alone.
MAX_PLAN_ERROR, MAX_MODEL_ERROR = 0.2, 0.2


def check_plan_against(repository: Path, measured: Path, out: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "plan",
            str(repository),
            "--measure",
            str(measured),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "predicted vs measured" in result.stdout
    checks = json.loads(out.read_text())["measured"]
    planned = {model["name"] for model in json.loads(out.read_text())["models"]}
    assert {c["model"] for c in checks} == planned | {"tritonserver"}  # every model and the server compared
    predicted, measured_total = sum(c["predicted_bytes"] for c in checks), sum(c["measured_bytes"] for c in checks)
    assert abs(predicted - measured_total) <= MAX_PLAN_ERROR * measured_total, (predicted, measured_total)
    allowed = stage_spreads(repository)
    off = {
        c["model"]: round(c["error"], 3)
        for c in checks
        if abs(c["predicted_bytes"] - c["measured_bytes"])
        > max(MAX_MODEL_ERROR, allowed.get(c["model"], 0.0)) * c["measured_bytes"]
    }
    assert not off, f"plan off by more than {MAX_MODEL_ERROR:.0%} (or the stage's measured spread): {off}"


def stage_spreads(repository: Path) -> dict[str, float]:
    """Each model's measured spread between soaks (`StageMemory.spread`, in its plan parameter)."""
    from tritonkit.families.base import PLAN_MEMORY_PARAMETER, StageMemory
    from tritonkit.repository import read_repository
    from tritonkit.triton_config import parameter

    spreads = {}
    for name, config in read_repository(repository).items():
        recorded = parameter(config, PLAN_MEMORY_PARAMETER)
        if recorded:
            spreads[name] = StageMemory.from_json(recorded).spread
    return spreads


def stub_pids(root_pid: int, model: str) -> list[int]:
    """The Python-backend stub processes of `model` below process `root_pid`."""
    from tritonkit.server import process_tree_rss

    pids = []
    for pid in process_tree_rss(root_pid):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" in command and f"/{model}/" in command:
            pids.append(pid)
    return pids


def embed_once(url: str, image: bytes) -> tuple[str, float]:
    """("ok" or the error, seconds) of one image embedding."""
    began = time.monotonic()
    try:
        with TritonkitClient(url, timeout_s=60) as client:
            client.embed_images([image])
        return "ok", time.monotonic() - began
    except InferenceError as exc:
        return str(exc), time.monotonic() - began


def kill_under_load(url: str, pid: int, threads: int = 8) -> tuple[list[tuple[str, float]], float]:
    """`threads` clients send JPEGs without pause; `pid` is SIGKILLed 2 s in; load stops 1 s later.
    Returns every request's result and when the kill happened."""
    image = encode_image(random_image(200, 260, seed=9), "JPEG")
    stop_load = threading.Event()

    def load():
        results = []
        while not stop_load.is_set():
            results.append(embed_once(url, image))
        return results

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(load) for _ in range(threads)]
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(1)
        stop_load.set()
        return [r for f in futures for r in f.result()], killed_at


def test_killed_stub_fails_requests_in_flight_fast_and_serve_brings_the_model_back(clip_repository, tmp_path):
    """Triton 2.51 does not restart a killed stub (its model would fail every later request), so
    `tritonkit serve` watches the stubs and restarts the server; docs/RELIABILITY.md quotes the times."""
    serve, url, _ = start_serve(clip_repository, tmp_path, "--cache-mb", "0")  # the encoder runs each time
    try:
        (stub,) = stub_pids(serve.pid, "clip_image_encoder")
        results, killed_at = kill_under_load(url, stub)
        failed = [r for r, _ in results if r != "ok"]
        print(f"failed around the kill: {len(failed)} of {len(results)}; errors: {sorted(set(failed))}")
        assert failed, "no request was in flight when the stub died"
        assert max(seconds for _, seconds in results) < 30, "a request hung after the stub died"
        assert serve.stdout.readline().startswith(f"tritonkit: a Python-backend process died (pid {stub}); restarting")
        restarted = serve.stdout.readline()
        assert restarted.startswith("tritonkit: tritonserver restarted (restart 1): serving again"), restarted
        assert embed_once(url, encode_image(random_image(64, 64), "JPEG"))[0] == "ok"
        print(f"served again {time.monotonic() - killed_at:.1f} s after the stub was killed ({restarted.strip()})")
        assert stub_pids(serve.pid, "clip_image_encoder") not in ([], [stub])
        assert serve.poll() is None
    finally:
        code = stop_serve(serve)
    assert code == 0
    assert (tmp_path / "server.log").read_text().count("Started GRPCInferenceService") == 2


def test_a_build_killed_at_any_moment_leaves_the_previous_repository_servable(tiny_clip_dir, clip_repository, tmp_path):
    import shutil

    from tritonkit.repository import read_repository

    out = tmp_path / "repo"
    shutil.copytree(clip_repository, out)
    before = {name: str(config) for name, config in read_repository(out).items()}

    def files(root):  # what a build writes (a server that loaded the models adds __pycache__)
        return sorted(p.relative_to(root) for p in root.rglob("*") if "__pycache__" not in p.parts)

    files_before = files(out)
    # Killed at the build's own steps (its progress lines), not at fixed times: with the export
    # cache warm a build can finish before a fixed delay, and a kill then tests nothing.
    for step in ("loading clip", "image_encoder", "text_encoder", "describing the cpu", "image_preprocess: serialize"):
        build = subprocess.Popen(
            [sys.executable, "-m", "tritonkit.cli", "build", "clip", "--model", str(tiny_clip_dir), "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen = []
        for line in build.stderr:
            seen.append(line.strip())
            if step in line:
                break
        assert build.poll() is None, f"the build ended before its step {step!r}: {seen}"
        build.kill()
        build.wait()
        build.stderr.close()
        assert {name: str(config) for name, config in read_repository(out).items()} == before, f"killed at {step!r}"
        assert files(out) == files_before
    server = start_server(out)
    try:
        with TritonkitClient(server.grpc_url) as client:
            assert client.embed_images([encode_image(random_image(100, 120), "JPEG")]).shape[0] == 1
    finally:
        server.stop()
    # the next build clears what the killed ones left beside the repository
    subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "build", "clip", "--model", str(tiny_clip_dir), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert not list(tmp_path.glob(".repo.staging-*"))
    assert {name: str(config) for name, config in read_repository(out).items()} == before  # same inputs, same configs


def tritonserver_pid(serve_pid: int) -> int:
    """The tritonserver process `tritonkit serve` runs now."""
    from tritonkit.server import process_tree_rss

    for pid in process_tree_rss(serve_pid):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command[0].endswith(b"bin/tritonserver"):
            return pid
    raise AssertionError("tritonkit serve runs no tritonserver")


def start_serve(repository: Path, tmp_path: Path, *args: str):
    from tests.conftest import free_port, serve_command

    grpc_port, metrics_port = free_port(), free_port()
    serve = subprocess.Popen(
        serve_command(repository, grpc_port, metrics_port, "--log-file", str(tmp_path / "server.log"), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = serve.stdout.readline()
    assert line.startswith("tritonkit: ready:"), line
    return serve, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"


def stop_serve(serve) -> int:
    serve.send_signal(signal.SIGTERM)
    try:
        return serve.wait(timeout=60)
    except subprocess.TimeoutExpired:
        serve.kill()
        return serve.wait()


def test_killed_tritonserver_under_load_fails_requests_fast_and_is_restarted(clip_repository, tmp_path):
    """A crash of tritonserver itself (what a bad request once caused) is recovered like a lost stub."""
    import urllib.request

    serve, url, metrics_url = start_serve(clip_repository, tmp_path, "--cache-mb", "0")  # the encoder runs each time
    try:
        server_pid = tritonserver_pid(serve.pid)
        results, killed_at = kill_under_load(url, server_pid)
        failed = [seconds for r, seconds in results if r != "ok"]
        assert failed, "no request was in flight when the server died"
        assert max(failed) < 10, f"a request took {max(failed):.1f} s to fail after the server died"
        died = serve.stdout.readline()
        assert died.startswith("tritonkit: tritonserver exited with signal 9 (SIGKILL); restarting tritonserver"), died
        restarted = serve.stdout.readline()
        assert restarted.startswith("tritonkit: tritonserver restarted (restart 1): serving again"), restarted
        assert embed_once(url, encode_image(random_image(64, 64), "JPEG"))[0] == "ok"
        print(f"served again {time.monotonic() - killed_at:.1f} s after tritonserver was killed ({restarted.strip()})")
        assert tritonserver_pid(serve.pid) != server_pid
        scraped = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        restarts = [line for line in scraped.splitlines() if line.startswith("tritonkit_server_restarts{")]
        assert restarts and all(line.endswith(" 1") for line in restarts), restarts
    finally:
        code = stop_serve(serve)
    assert code == 0


def test_a_crash_loop_ends_serve_with_the_servers_last_log_lines(tmp_path):
    from tests.test_batch_isolation import write_faulty_repository

    repository = write_faulty_repository(tmp_path / "repository")
    serve, _, _ = start_serve(repository, tmp_path, "--max-restarts", "1", "--restart-window", "600")
    try:
        os.kill(tritonserver_pid(serve.pid), signal.SIGKILL)
        assert serve.stdout.readline().startswith("tritonkit: tritonserver exited with signal 9 (SIGKILL); restarting")
        assert serve.stdout.readline().startswith("tritonkit: tritonserver restarted (restart 1)")
        os.kill(tritonserver_pid(serve.pid), signal.SIGKILL)
        output = serve.communicate(timeout=60)[0]
    finally:
        if serve.poll() is None:
            stop_serve(serve)
    assert serve.returncode == 2
    assert "error: tritonserver exited with signal 9 (SIGKILL): 2 crashes within 600 s, not restarting again" in output
    assert "its last log lines:" in output and "Started GRPCInferenceService" in output  # the log's tail, verbatim
    assert f"[log: {tmp_path / 'server.log'}]" in output
