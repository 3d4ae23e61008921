"""The README's first command, `bash scripts/demo.sh`, as a new user sees it; then the README's
examples, as written, against the demo's repository."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent


def three_free_ports() -> int:
    """A base port with the next two free as well (HTTP, gRPC, metrics)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base > 65000:
            continue
        try:
            sockets = []
            for port in (base, base + 1, base + 2):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no three consecutive free ports")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run once: its result and its folder (the README's `demo/`)."""
    folder = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "TRITONKIT_DEMO_DIR": str(folder), "TRITONKIT_DEMO_PORT": str(three_free_ports())},
    )
    return result, folder


def test_the_demo_prints_its_steps_something_to_judge_and_what_to_try_next(demo):
    result, _ = demo
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    steps = re.findall(r"^\[(\d)/9\] ", result.stdout, flags=re.M)
    assert steps == [str(k) for k in range(1, 10)], out
    assert len(re.findall(r"done in \d+ s$", result.stdout, flags=re.M)) == 7
    assert result.stdout.count("tritonkit: ready: ") == 2  # each server's ready line
    assert "caption 1: an orange square" in result.stdout and "random weights" in result.stdout
    assert "Hello there" in result.stdout and "00:00:00,000 -->" in result.stdout  # the subtitles
    assert "Next:\n  . .venv/bin/activate" in result.stdout and "curl" in result.stdout
    assert "Traceback" not in out and "Warning" not in out and "warn" not in out.lower()


def readme_examples() -> list[tuple[str, str]]:
    """(language, code) of each block of the README's "One example per contract" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## One example per contract", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def test_the_readmes_examples_run_as_written_against_the_demos_repository(demo, llava_repository, tmp_path):
    """Every block of the README's examples, with the demo's folder for `demo/` and free ports
    for the default ones; a LLaVA build added to the repository, as the README says to."""
    import shutil
    import signal
    import sys
    import urllib.request

    from tests.conftest import free_port, wait_until_healthy

    result, folder = demo
    assert result.returncode == 0, result.stdout + result.stderr
    for model in llava_repository.iterdir():
        shutil.copytree(model, folder / "model_repository" / model.name, dirs_exist_ok=True)
    grpc, openai = free_port(), free_port()

    def as_here(code: str) -> str:
        code = code.replace("demo/", f"{folder}/").replace(":9000", f":{openai}").replace(":8001", f":{grpc}")
        code = re.sub(r"^(tritonkit (?:transcribe|chat) .*)$", rf"\1 --url 127.0.0.1:{grpc}", code, flags=re.M)
        return code.replace(
            "--openai-port 9000",
            f"--grpc-port {grpc} --http-port {free_port()} --metrics-port {free_port()} --openai-port {openai}",
        )

    (serve_block, *calls) = readme_examples()
    assert serve_block[0] == "bash" and serve_block[1].startswith("tritonkit serve "), serve_block
    assert len(calls) == 4, calls
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    serve = subprocess.Popen(["bash", "-c", "exec " + as_here(serve_block[1])], env=env, cwd=tmp_path)
    try:
        wait_until_healthy(f"http://127.0.0.1:{openai}", timeout=300)
        outputs = []
        for language, code in calls:
            command = ["bash", "-euo", "pipefail", "-c"] if language == "bash" else [sys.executable, "-c"]
            ran = subprocess.run(
                [*command, as_here(code)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
            )
            assert ran.returncode == 0, f"{code}\n{ran.stdout}\n{ran.stderr}"
            outputs.append(ran.stdout)
        models = urllib.request.urlopen(f"http://127.0.0.1:{openai}/v1/models", timeout=10).read().decode()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    assert all(f'"{m}"' in models for m in ("clip", "whisper", "llava"))
    curls, sdk, client, cli = outputs
    decoder = json.JSONDecoder()
    embeddings, end = decoder.raw_decode(curls)
    transcription, _ = decoder.raw_decode(curls[end:].lstrip())
    assert len(embeddings["data"]) == 2 and len(embeddings["data"][1]["embedding"]) > 8
    assert "Hello" in transcription["text"] and transcription["words"][0]["start"] >= 0
    assert sdk.strip()  # the streamed haiku of a random model: some text
    assert "Hello" in client and "(' Hello'," in client
    assert "00:00:00,000 -->" in cli and cli.count("-->") >= 3
