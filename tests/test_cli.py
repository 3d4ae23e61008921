"""The `tritonkit` command as a user runs it: a real process, a real server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import encode_image, random_image, serve_command
from tritonkit.server import free_port

TRITONKIT = [sys.executable, "-m", "tritonkit.cli"]


def run(*args, timeout=300, **kwargs):
    return subprocess.run([*TRITONKIT, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def ports() -> list[str]:
    return ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port())]


def test_cli_prints_one_line_without_traceback_when_family_is_unknown():
    result = run("build", "nosuchfamily", "--model", "x")
    assert result.returncode == 2
    assert "unknown model family 'nosuchfamily'" in result.stderr
    assert "Traceback" not in result.stderr


def test_build_flags_come_from_the_families_options_and_another_familys_flag_is_refused(tmp_path):
    """Each family's options class (FamilySpec.options_class) gives `build` its flags, their help
    naming the families that take them; a flag of another family fails in one line naming the
    flags this one takes, before any work."""
    import dataclasses

    from tritonkit.families import registry

    shown = " ".join(run("build", "--help", env={**os.environ, "COLUMNS": "400"}).stdout.split())
    for spec in registry().values():
        for option in dataclasses.fields(spec.options_class):
            assert f"--{option.name.replace('_', '-')}" in shown, option.name
    assert "(qwen2_5vl, qwen2vl)" in shown and "(whisper)" in shown
    result = run("build", "whisper", "--model", str(tmp_path / "nothing"), "--max-image-tokens", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: --max-image-tokens is not an option of whisper (whisper takes --audio-padding, --diarize, --max-audio-seconds)"
    )
    refused = run("build", "clip", "--model", str(tmp_path / "nothing"), "--max-prompt-bytes", "10")
    assert refused.returncode == 2 and "--max-prompt-bytes is not an option of clip" in refused.stderr


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, subcommand, flags) of every `tritonkit SUBCOMMAND ...` line in the README's and the
    docs' code blocks (synopses included, continuation lines joined)."""
    import re

    root = Path(__file__).resolve().parent.parent
    found = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            joined = re.sub(r"\n\s+\[", " [", joined)  # a synopsis's wrapped option lines
            for line in joined.splitlines():
                match = re.match(r"\s*(?:\$ )?tritonkit ([a-z][a-z0-9-]*)(.*)", line)
                if match:
                    command, rest = match.groups()
                    rest = rest.split("  #", 1)[0]
                    found.append((page.name, command, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest)))
    return found


def test_every_tritonkit_command_in_the_docs_is_a_command_with_those_flags():
    """The docs' command lines (examples and synopses, those that need a GPU or a cluster too) name
    commands and flags the CLI has: a renamed flag cannot leave a page behind."""
    import typer.main

    from tritonkit.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    documented = documented_commands()
    assert len(documented) > 40 and {page for page, _, _ in documented} >= {"README.md", "CLI.md", "DEPLOY.md"}
    wrong = []
    for page, command, flags in documented:
        if command not in commands:
            wrong.append((page, command))
            continue
        known = {opt for param in commands[command].params for opt in [*param.opts, *param.secondary_opts]}
        wrong += [(page, command, flag) for flag in flags if flag not in known | {"--help"}]
    assert not wrong, wrong


def test_cli_shows_the_traceback_when_debugging(tmp_path):
    result = run("build", "nosuchfamily", "--model", "x", env={**os.environ, "TRITONKIT_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.server
def test_serve_exits_nonzero_with_the_server_error_when_a_model_is_broken(clip_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(clip_repository / "clip_text_tokenizer", repo / "clip_text_tokenizer")
    (repo / "clip_text_tokenizer" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('deliberately broken model')\n"
    )
    log = tmp_path / "server.log"
    result = run("serve", str(repo), *ports(), "--log-file", str(log))
    assert result.returncode == 2
    assert "deliberately broken model" in result.stderr
    assert "Traceback (most recent call last)" not in result.stderr.split("deliberately")[0]
    assert result.stderr.rstrip().endswith(f"[log: {log}]"), result.stderr[-300:]  # rich read it as markup once


@pytest.mark.server
def test_serve_reports_ready_and_stops_cleanly_when_interrupted(clip_repository, tmp_path):
    grpc_port = free_port()
    process = subprocess.Popen(
        serve_command(clip_repository, grpc_port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("tritonkit: ready: 6 models on grpc 127.0.0.1:"), line + process.stderr.read()
        image = tmp_path / "cat.jpg"
        image.write_bytes(encode_image(random_image(100, 120), "JPEG"))
        result = run(
            "infer",
            "clip_image",
            str(image),
            "--url",
            f"127.0.0.1:{grpc_port}",
            "--json",
            "--save",
            str(tmp_path / "e.npy"),
        )
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout.splitlines()[0])
        assert record["input"] == str(image) and len(record["embedding"]) == 32
        assert np.allclose(np.load(tmp_path / "e.npy")[0], record["embedding"], atol=1e-6)
        text = run("infer", "clip_text", "a cat", "a dog", "--url", f"127.0.0.1:{grpc_port}")
        assert text.returncode == 0 and text.stdout.count("dim 32") == 2
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.server
def test_serve_refuses_to_start_when_port_is_taken(clip_repository):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        result = run("serve", str(clip_repository), "--grpc-port", str(taken))
    assert result.returncode == 2
    assert f"port {taken} (grpc) on 127.0.0.1 is already in use" in result.stderr


def test_serve_names_every_busy_port_at_once(clip_repository):
    import socket

    with socket.socket() as grpc_sock, socket.socket() as http_sock:
        for sock in (grpc_sock, http_sock):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        grpc_port, http_port = grpc_sock.getsockname()[1], http_sock.getsockname()[1]
        result = run(
            "serve",
            str(clip_repository),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(free_port()),
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"ports {grpc_port} (grpc), {http_port} (http) on 127.0.0.1 are already in use "
        "(pass --grpc-port and --http-port with free ports)"
    ) in result.stderr


def test_infer_names_the_server_when_it_is_not_there(tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(b"x")
    result = run("infer", "clip_image", str(image), "--url", f"127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 2 and "is not available at" in result.stderr


def test_preprocess_command_saves_the_encoder_input_the_server_computes(clip_repository, clip_loaded, tmp_path):
    import subprocess
    import sys

    import numpy as np

    from tests.conftest import encode_image, random_image
    from tritonkit.preprocessing.dali import image_pixels

    spec, loaded = clip_loaded
    image = encode_image(random_image(300, 200, seed=3), "PNG")
    (tmp_path / "a.png").write_bytes(image)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "preprocess",
            str(clip_repository),
            "clip_image",
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path / "pixels.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "PIXEL_VALUES: shape [1, 3, 224, 224] float32" in result.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "pixels.npy"), image_pixels(spec.image_recipe(loaded), [image]))


@pytest.mark.server
def test_serve_forwards_sigterm_and_the_server_exits_within_its_timeout(clip_repository):
    import time

    from tritonkit.server import EXIT_TIMEOUT_S, process_tree_rss

    args = ["serve", str(clip_repository), *ports()]
    process = subprocess.Popen([*TRITONKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("tritonkit: ready:")
        tree = set(process_tree_rss(process.pid))
        assert len(tree) > 2  # tritonkit, tritonserver, stubs
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_TIMEOUT_S + 15) == 0
        assert time.monotonic() - began < EXIT_TIMEOUT_S + 10
        time.sleep(1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in tree - {process.pid}), "server processes outlived serve"
    finally:
        if process.poll() is None:
            process.kill()


def test_build_names_an_unwritable_out_before_any_work(tiny_clip_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run("build", "clip", "--model", str(tiny_clip_dir), "--out", str(blocker / "repo"))
    assert result.returncode == 2
    assert f"--out {blocker / 'repo'}: cannot write beside it" in result.stderr and "Traceback" not in result.stderr
    assert "loading clip" not in result.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing model directory", "no such directory"),
        ("directory without a model", "no config.json in that directory"),
        ("model of another family", "is a 'clip' model, not whisper (build it with `tritonkit build clip`)"),
    ],
)
def test_build_names_a_bad_model_directory_in_one_line(case, message, tiny_clip_dir, tmp_path):
    model = {
        "missing model directory": tmp_path / "nowhere",
        "directory without a model": tmp_path,
        "model of another family": tiny_clip_dir,
    }[case]
    family = "whisper" if case == "model of another family" else "clip"
    result = run("build", family, "--model", str(model), "--out", str(tmp_path / "repo"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr  # the error (wrapped), nothing else


@pytest.mark.server
def test_infer_calls_every_family_shows_every_output_and_fails_a_bad_file_alone(
    clip_server, whisper_server, llava_server, speech_files, tmp_path
):
    image, broken, speech = tmp_path / "cat.jpg", tmp_path / "broken.jpg", tmp_path / "hello.wav"
    image.write_bytes(encode_image(random_image(90, 120, seed=3), "JPEG"))
    broken.write_bytes(b"not an image")
    speech.write_bytes(speech_files[1])

    images = run(
        "infer", "clip_image", str(image), str(broken), str(tmp_path / "gone.jpg"), "--url", clip_server.grpc_url
    )
    assert images.returncode == 2 and "Traceback" not in images.stderr
    assert f"{image}:\n  IMAGE_EMBEDS: dim 32" in images.stdout  # the good file is answered
    assert f"{broken}: IMAGE: not a decodable image" in images.stderr
    assert f"{tmp_path / 'gone.jpg'}: no such file" in images.stderr

    whisper = run(
        "infer", "whisper", str(speech), "--input", "TIMESTAMPS=true", "--json", "--url", whisper_server.grpc_url
    )
    assert whisper.returncode == 0, whisper.stderr
    record = json.loads(whisper.stdout)
    assert set(record["outputs"]) == {
        "TEXT",
        "TOKENS",
        "DECODED_LANGUAGE",
        "SEGMENT_TIMES",
        "SEGMENT_TEXTS",
        "SEGMENT_STATS",
        "WORD_TIMES",
        "WORD_TEXTS",
        "WORD_PROBS",
    }
    assert "test" in record["outputs"]["TEXT"] and record["outputs"]["SEGMENT_TIMES"][0][0] >= 0

    chat = run(
        "infer",
        "llava_chat",
        str(image),
        "--input",
        "PROMPT=What is it?",
        "--input",
        "MAX_NEW_TOKENS=4",
        "--url",
        llava_server.grpc_url,
    )
    assert chat.returncode == 0, chat.stderr
    assert "TEXT:" in chat.stdout and "COMPLETION_TOKENS: " in chat.stdout and "FINISH_REASON: " in chat.stdout

    for args, message in (
        (["--input", "TIMESTAMPS=maybe"], "TIMESTAMPS: 'maybe' is not a bool value"),
        (["--input", "NOPE=1"], "--input NOPE: whisper has no such input"),
        (["--input", "TIMESTAMPS"], "--input 'TIMESTAMPS': write NAME=VALUE"),
    ):
        bad = run("infer", "whisper", str(speech), *args, "--url", whisper_server.grpc_url)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
