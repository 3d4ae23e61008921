"""Shared fixtures: a tiny random CLIP (real architecture and tokenizer), its repository, a real server."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tritonkit import samples
from tritonkit.build import build
from tritonkit.samples import SENTENCES
from tritonkit.families import get_family
from tritonkit.server import TritonServer, free_port
from tritonkit.tiny import make_tiny_clip


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


def start_server(repository: Path, **kwargs) -> TritonServer:
    server = TritonServer(
        repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), **kwargs
    )
    return server.start().wait_until_ready(300)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "model")


@pytest.fixture(scope="session")
def clip_loaded(tiny_clip_dir):
    spec = get_family("clip")
    return spec, spec.load(str(tiny_clip_dir))


@pytest.fixture(scope="session")
def clip_repository(tiny_clip_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip_repo") / "model_repository"
    build("clip", str(tiny_clip_dir), out)
    return out


@pytest.fixture(scope="session")
def clip_server(clip_repository):
    server = start_server(clip_repository)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clip_python_server(tiny_clip_dir, tmp_path_factory):
    """CLIP with --preprocessing python (PIL), the exact transformers path."""
    from tritonkit.families.base import BuildOptions

    out = tmp_path_factory.mktemp("clip_python_repo") / "model_repository"
    build("clip", str(tiny_clip_dir), out, options=BuildOptions(preprocessing="python"))
    server = start_server(out)
    yield server
    server.stop()


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
def multilingual_whisper_dir(tmp_path_factory) -> Path:
    from tritonkit.tiny import make_tiny_whisper

    return make_tiny_whisper(tmp_path_factory.mktemp("whisper_multilingual") / "model")


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
def tiny_llava_dir(tmp_path_factory) -> Path:
    from tritonkit.tiny import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model")


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
