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


def examples(page: str, section: str | None = None) -> list[tuple[str, str]]:
    """(language, code) of each bash and python block of a page (or of one of its sections)."""
    text = (ROOT / page).read_text()
    if section is not None:
        text = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S)


def test_the_docs_examples_run_as_written_against_the_demos_repository(
    demo, llava_repository, qwen2vl_repository, tmp_path
):
    """Every block of the README's examples and of the pages that call a served repository
    (docs/FAMILIES.md, docs/OPENAI.md), with the demo's folder for `demo/` and free ports for the
    default ones; LLaVA and Qwen2-VL builds added to the repository, as the docs say to."""
    import shutil
    import signal
    import sys
    import urllib.request

    from tests.conftest import free_port, wait_until_healthy

    result, folder = demo
    assert result.returncode == 0, result.stdout + result.stderr
    for built in (llava_repository, qwen2vl_repository):
        for model in built.iterdir():
            shutil.copytree(model, folder / "model_repository" / model.name, dirs_exist_ok=True)
    grpc, openai = free_port(), free_port()

    def as_here(code: str) -> str:
        code = code.replace("demo/", f"{folder}/").replace(":9000", f":{openai}").replace(":8001", f":{grpc}")
        code = re.sub(r"^(tritonkit (?:transcribe|chat) .*)$", rf"\1 --url 127.0.0.1:{grpc}", code, flags=re.M)
        return code.replace(
            "--openai-port 9000",
            f"--grpc-port {grpc} --http-port {free_port()} --metrics-port {free_port()} --openai-port {openai}",
        )

    (serve_block, *readme) = examples("README.md", "One example per contract")
    assert serve_block[0] == "bash" and serve_block[1].startswith("tritonkit serve "), serve_block
    pages = {"README.md": readme, "docs/FAMILIES.md": examples("docs/FAMILIES.md")}
    pages["docs/OPENAI.md"] = examples("docs/OPENAI.md")
    assert [len(blocks) for blocks in pages.values()] == [4, 3, 2], pages
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    serve = subprocess.Popen(["bash", "-c", "exec " + as_here(serve_block[1])], env=env, cwd=tmp_path)
    outputs: dict[str, list[str]] = {}
    try:
        wait_until_healthy(f"http://127.0.0.1:{openai}", timeout=300)
        for page, blocks in pages.items():
            for language, code in blocks:
                command = ["bash", "-euo", "pipefail", "-c"] if language == "bash" else [sys.executable, "-c"]
                ran = subprocess.run(
                    [*command, as_here(code)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
                )
                assert ran.returncode == 0, f"{page}:\n{code}\n{ran.stdout}\n{ran.stderr}"
                outputs.setdefault(page, []).append(ran.stdout)
        models = urllib.request.urlopen(f"http://127.0.0.1:{openai}/v1/models", timeout=10).read().decode()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    assert all(f'"{m}"' in models for m in ("clip", "whisper", "llava", "qwen2vl"))
    curls, sdk, client, cli = outputs["README.md"]
    decoder = json.JSONDecoder()
    embeddings, end = decoder.raw_decode(curls)
    transcription, _ = decoder.raw_decode(curls[end:].lstrip())
    assert len(embeddings["data"]) == 2 and len(embeddings["data"][1]["embedding"]) > 8
    assert "Hello" in transcription["text"] and transcription["words"][0]["start"] >= 0
    assert sdk.strip()  # the streamed haiku of a random model: some text
    assert "Hello" in client and "(' Hello'," in client
    assert "00:00:00,000 -->" in cli and cli.count("-->") >= 3
    options, two_images, clip = outputs["docs/FAMILIES.md"]
    assert "Hello" in options and " en\n" in options and "[[0." in options  # text, language, segment times
    assert two_images.strip() and "(2, " in clip
    listed, sdk = outputs["docs/OPENAI.md"]
    answers = []
    rest = listed.strip()
    while rest:
        answer, end = decoder.raw_decode(rest)
        answers.append(answer)
        rest = rest[end:].lstrip()
    assert [a.get("object") for a in answers] == ["list", "list", None, "chat.completion"], answers
    assert "Hello" in answers[2]["text"] and answers[3]["choices"][0]["message"]["content"]
    assert sdk.strip()
