"""Shared fixtures: a tiny random CLIP (real architecture and tokenizer), its repository, a real server."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image

from tritonkit import samples
from tritonkit.build import build
from tritonkit.contracts import EMBEDDINGS
from tritonkit.families import get_family, registry
from tritonkit.samples import SENTENCES
from tritonkit.server import TritonServer, free_port


@pytest.fixture(scope="session", autouse=True)
def export_cache_dir(tmp_path_factory):
    """Builds in tests share one export cache of their own, never the user's."""
    folder = tmp_path_factory.mktemp("export_cache")
    previous = os.environ.get("TRITONKIT_CACHE_DIR")
    os.environ["TRITONKIT_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("TRITONKIT_CACHE_DIR", None)
    else:
        os.environ["TRITONKIT_CACHE_DIR"] = previous


T = TypeVar("T")


def runs_until_batched(
    client, model: str, run: Callable[[], T], attempts: int = 3, rows: int = 1
) -> tuple[list[T], dict[int, int]]:
    """Every result of `run()` (concurrent requests), repeated until Triton's statistics show `model`
    executed a batch of more than one during a run, and the batch sizes it formed then ({} if none did).
    Whether requests in flight together share a batch is up to timing on a loaded machine; the
    results must hold in every run, batched or not. `rows`: how many batch rows a run sends `model`,
    waited for in its statistics before a run is judged."""
    from tritonkit.client import executed_batch_sizes

    results = []
    for _ in range(attempts):
        before = executed_batch_sizes(client.statistics(model), model)
        results.append(run())
        formed = executions_since(client, model, before, rows)
        if any(size > 1 for size in formed):
            return results, formed
    return results, {}


def executions_since(
    client, model: str, before: dict[int, int], at_least: int = 1, timeout: float = 10
) -> dict[int, int]:
    """Batch size -> executions of `model` since `before` (its executed_batch_sizes), once they hold
    `at_least` rows. A model that answers through its response sender (Whisper's decoder) has its
    statistics recorded after the answer, so they are polled for."""
    import time

    from tritonkit.client import executed_batch_sizes

    deadline = time.monotonic() + timeout
    while True:
        after = executed_batch_sizes(client.statistics(model), model)
        formed = {size: count - before.get(size, 0) for size, count in after.items() if count > before.get(size, 0)}
        if sum(size * count for size, count in formed.items()) >= at_least or time.monotonic() > deadline:
            return formed
        time.sleep(0.05)


def has_gpu() -> bool:
    return os.path.exists("/dev/nvidia0")


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def encode_image(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def random_image(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A smooth random picture (JPEG-friendly), uint8 HxWxC."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), channels), dtype=np.uint8)
    image = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse).resize((width, height), Image.BILINEAR)
    noise = rng.integers(-12, 13, (height, width, channels))
    return np.clip(np.asarray(image).reshape(height, width, channels) + noise, 0, 255).astype(np.uint8)


def serve_command(repository: Path, grpc_port: int, metrics_port: int | None = None, *extra: str) -> list[str]:
    """`tritonkit serve REPOSITORY` as a subprocess command: gRPC (and metrics) on the ports given,
    HTTP on a free one."""
    return [
        sys.executable,
        "-m",
        "tritonkit.cli",
        "serve",
        str(repository),
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(metrics_port or free_port()),
        *extra,
    ]


def copy_with_parameters(repository: Path, model: str, parameters: dict[str, str], out: Path) -> Path:
    """A copy of `repository` at `out` whose `model` has these config parameters set."""
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(repository, out, ignore=shutil.ignore_patterns("__pycache__"))
    path = out / model / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    for name, value in parameters.items():
        config.parameters[name].string_value = value
    path.write_text(text_format.MessageToString(config))
    return out


def wait_until_healthy(base: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def serve_with_gateway(repository: Path, api_key: str):
    """`tritonkit serve REPO --openai-port` with an API key, as a user runs it: (the gateway's base
    URL, tritonserver's gRPC address) once both answer; stopped with SIGTERM after."""
    import signal
    import subprocess

    grpc_port, openai_port = free_port(), free_port()
    serve = subprocess.Popen(
        serve_command(repository, grpc_port, None, "--openai-port", str(openai_port), "--cache-mb", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TRITONKIT_API_KEY": api_key},
    )
    line = serve.stdout.readline()
    assert line.startswith("tritonkit: ready:") and f"OpenAI API http://127.0.0.1:{openai_port}/v1" in line, line
    base = f"http://127.0.0.1:{openai_port}"
    wait_until_healthy(base)
    try:
        yield base, f"127.0.0.1:{grpc_port}"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)


def start_server(repository: Path, **kwargs) -> TritonServer:
    server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), **kwargs)
    return server.start().wait_until_ready(300)


# Families whose ensembles are NAME_image and NAME_text (CLIP and its variants): the embedding
# tests run once per family, derived from the registry.
EMBEDDING_FAMILIES = sorted(name for name, spec in registry().items() if spec.contract is EMBEDDINGS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family -> a tiny random model of it (its spec's `make_tiny`), made once per session."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = get_family(family).make_tiny(tmp_path_factory.mktemp(f"tiny_{family}") / "model")
        return made[family]

    return make


@pytest.fixture(scope="session")
def embedding_repositories(tiny_model_dir, tmp_path_factory):
    """(family, preprocessing) -> the repository of that embedding family's tiny model, built once."""
    from tritonkit.families.base import BuildOptions

    built: dict[tuple[str, str], Path] = {}

    def get(family: str, preprocessing: str = "dali") -> Path:
        if (family, preprocessing) not in built:
            out = tmp_path_factory.mktemp(f"{family}_{preprocessing}_repo") / "model_repository"
            build(family, str(tiny_model_dir(family)), out, options=BuildOptions(preprocessing=preprocessing))
            built[family, preprocessing] = out
        return built[family, preprocessing]

    return get


@pytest.fixture(scope="session")
def embedding_servers(embedding_repositories, tiny_model_dir):
    """(family, preprocessing) -> (spec, loaded, repository, server), started once per session."""
    started: dict[tuple[str, str], tuple] = {}

    def get(family: str, preprocessing: str = "dali"):
        if (family, preprocessing) not in started:
            spec = get_family(family)
            repository = embedding_repositories(family, preprocessing)
            started[family, preprocessing] = (
                spec,
                spec.load(str(tiny_model_dir(family))),
                repository,
                start_server(repository),
            )
        return started[family, preprocessing]

    yield get
    for *_, server in started.values():
        server.stop()


def _qwen_repository(family: str, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"{family}_repo") / "model_repository"
    build(family, str(tiny_model_dir(family)), out)
    return out


@pytest.fixture(scope="session")
def qwen2vl_repository(tiny_model_dir, tmp_path_factory) -> Path:
    return _qwen_repository("qwen2vl", tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2_5vl_repository(tiny_model_dir, tmp_path_factory) -> Path:
    return _qwen_repository("qwen2_5vl", tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def family_repository(request, embedding_repositories):
    """family -> a built repository of it: the tiny model (Whisper: the real tiny.en)."""

    def get(family: str) -> Path:
        if family in EMBEDDING_FAMILIES:
            return embedding_repositories(family)
        return request.getfixturevalue(f"{family}_repository")

    return get


@pytest.fixture(scope="session")
def speaker_repository(tmp_path_factory) -> Path:
    """The speaker family with resemblyzer's trained encoder (its package ships the weights)."""
    out = tmp_path_factory.mktemp("speaker_repo") / "model_repository"
    build("speaker", "resemblyzer", out)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("clip")


@pytest.fixture(scope="session")
def clip_loaded(tiny_clip_dir):
    spec = get_family("clip")
    return spec, spec.load(str(tiny_clip_dir))


@pytest.fixture(scope="session")
def clip_repository(embedding_repositories) -> Path:
    return embedding_repositories("clip")


@pytest.fixture(scope="session")
def clip_server(embedding_servers):
    return embedding_servers("clip")[3]


# -- Whisper ------------------------------------------------------------------------------------
def speak(text: str, path: Path) -> Path:
    if not samples.espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return samples.speak(text, path)


@pytest.fixture(scope="session")
def speech_files(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("speech")
    return [speak(text, folder / f"{i}.wav").read_bytes() for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="session")
def long_speech(speech_files) -> bytes:
    """A WAV file of 40-50 s: the sample sentences with 2 s of silence after each (long-form)."""
    import soundfile

    from tritonkit.preprocessing.audio import AudioRecipe, decode_audio

    pieces = []
    for clip in speech_files[:8]:
        pieces += [decode_audio(clip, AudioRecipe()), np.zeros(2 * 16000, dtype=np.float32)]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.concatenate(pieces), 16000, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory) -> Path:
    from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper

    return convert_ct2_whisper(bundled_tiny_en(), tmp_path_factory.mktemp("whisper") / "tiny.en")


@pytest.fixture(scope="session")
def whisper_loaded(whisper_dir):
    spec = get_family("whisper")
    return spec, spec.load(str(whisper_dir))


@pytest.fixture(scope="session")
def whisper_repository(whisper_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whisper_repo") / "model_repository"
    build("whisper", str(whisper_dir), out)
    return out


@pytest.fixture(scope="session")
def whisper_server(whisper_repository):
    server = start_server(whisper_repository)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def whisper_int8(whisper_dir, tmp_path_factory):
    """Whisper tiny.en built at INT8 static (what `auto` keeps for it: dynamic misses the WER bound)."""
    from tritonkit.precision import PrecisionOptions

    out = tmp_path_factory.mktemp("whisper_int8") / "model_repository"
    return build("whisper", str(whisper_dir), out, precision=PrecisionOptions("int8", "static"))


@pytest.fixture(scope="session")
def multilingual_whisper_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("whisper")  # the family's tiny model is a random multilingual Whisper


@pytest.fixture(scope="session")
def multilingual_whisper_loaded(multilingual_whisper_dir):
    spec = get_family("whisper")
    return spec, spec.load(str(multilingual_whisper_dir))


@pytest.fixture(scope="session")
def multilingual_whisper_server(multilingual_whisper_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whisper_multilingual_repo") / "model_repository"
    build("whisper", str(multilingual_whisper_dir), out)
    server = start_server(out)
    yield server
    server.stop()


# -- LLaVA --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llava")


@pytest.fixture(scope="session")
def llava_loaded(tiny_llava_dir):
    spec = get_family("llava")
    return spec, spec.load(str(tiny_llava_dir))


@pytest.fixture(scope="session")
def llava_repository(tiny_llava_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llava_repo") / "model_repository"
    build("llava", str(tiny_llava_dir), out)
    return out


@pytest.fixture(scope="session")
def llava_server(llava_repository):
    server = start_server(llava_repository)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def answers_conform_to_openais_document():
    """Fails a test that received a gateway answer OpenAI's API description rejects
    (tests/openai_conformance.py checks each answer of the clients made there)."""
    yield
    checker = sys.modules.get("tests.openai_conformance")
    if checker is not None and checker.VIOLATIONS:
        found = list(checker.VIOLATIONS)
        checker.VIOLATIONS.clear()
        pytest.fail("answers not valid against OpenAI's API description:\n" + "\n".join(found[:20]))
