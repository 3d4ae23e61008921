"""`--target gpu` repositories: written and checked here, served only where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import encode_image, random_image, start_server
from tritonkit.build import build
from tritonkit.errors import ServerError
from tritonkit.families.base import BuildOptions
from tritonkit.repository import read_repository


@pytest.fixture(scope="module")
def gpu_clip_repository(tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_clip") / "model_repository"
    build("clip", str(tiny_clip_dir), out, options=BuildOptions(target="gpu"))
    return out


@pytest.fixture(scope="module")
def gpu_whisper_repository(multilingual_whisper_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_whisper") / "model_repository"
    build("whisper", str(multilingual_whisper_dir), out, options=BuildOptions(target="gpu"))
    return out


def kinds(config) -> set[str]:
    from tritonclient.grpc import model_config_pb2

    return {model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group}


def test_gpu_clip_repository_uses_the_dali_and_onnxruntime_backends(gpu_clip_repository):
    configs = read_repository(gpu_clip_repository)
    check, preprocess = configs["clip_image_check"], configs["clip_image_preprocess"]
    assert (check.backend, kinds(check)) == ("python", {"KIND_CPU"})
    assert (preprocess.backend, kinds(preprocess)) == ("dali", {"KIND_GPU"})
    assert preprocess.input[0].name == "CHECKED_IMAGE" and preprocess.input[0].allow_ragged_batch
    assert (gpu_clip_repository / "clip_image_preprocess" / "1" / "model.dali").stat().st_size > 0
    for encoder in ("clip_image_encoder", "clip_text_encoder"):
        assert (configs[encoder].backend, kinds(configs[encoder])) == ("onnxruntime", {"KIND_GPU"})
        assert (gpu_clip_repository / encoder / "1" / "model.onnx").is_file()
    steps = [s.model_name for s in configs["clip_image"].ensemble_scheduling.step]
    assert steps == ["clip_image_check", "clip_image_preprocess", "clip_image_encoder"]


def test_gpu_whisper_repository_computes_log_mel_in_dali(gpu_whisper_repository):
    configs = read_repository(gpu_whisper_repository)
    assert (configs["whisper_log_mel"].backend, kinds(configs["whisper_log_mel"])) == ("dali", {"KIND_GPU"})
    decoder = configs["whisper_decoder"]
    assert kinds(decoder) == {"KIND_GPU"}
    assert decoder.parameters["providers"].string_value.startswith("CUDAExecutionProvider")
    steps = [s.model_name for s in configs["whisper"].ensemble_scheduling.step]
    assert steps == ["whisper_audio_preprocess", "whisper_log_mel", "whisper_encoder", "whisper_decoder"]


def test_gpu_repository_fails_clearly_on_the_bundled_cpu_server(gpu_clip_repository):
    with pytest.raises(ServerError, match="needs the dali, onnxruntime backend"):
        start_server(gpu_clip_repository)


def test_preprocess_command_explains_that_gpu_dali_models_need_a_gpu(gpu_clip_repository, tmp_path):
    import subprocess
    import sys

    image = tmp_path / "cat.jpg"
    image.write_bytes(encode_image(random_image(120, 160), "JPEG"))
    result = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "preprocess", str(gpu_clip_repository), "clip_image", str(image)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "DALI-backend model with GPU operators" in result.stderr and "--target cpu" in result.stderr


@pytest.mark.gpu
def test_gpu_clip_repository_serves_on_a_gpu_server(gpu_clip_repository):
    """Never run here: needs an NGC tritonserver (DALI and ONNX Runtime backends) and a GPU."""
    from tritonkit.client import TritonkitClient

    server = start_server(gpu_clip_repository)
    try:
        with TritonkitClient(server.grpc_url) as client:
            embeds = client.embed_images([encode_image(random_image(240, 320), "JPEG")])
        assert embeds.shape[0] == 1 and np.isfinite(embeds).all()
    finally:
        server.stop()
