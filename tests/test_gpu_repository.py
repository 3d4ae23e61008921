"""`--target gpu` repositories: written and checked here, served only where a GPU exists."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import EMBEDDING_FAMILIES, encode_image, has_gpu, random_image, start_server
from tritonkit.build import build
from tritonkit.errors import ServerError
from tritonkit.families import family_names
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


@pytest.fixture(scope="module", params=family_names())
def gpu_family_repository(request, tiny_model_dir, tmp_path_factory):
    """Every registered family's tiny model built for --target gpu."""
    family = request.param
    out = tmp_path_factory.mktemp(f"gpu_{family}") / "model_repository"
    build(family, str(tiny_model_dir(family)), out, options=BuildOptions(target="gpu"))
    return family, out


def test_gpu_repository_of_every_family_passes_check_and_round_trips(gpu_family_repository):
    from tritonkit.check import check_repository
    from tritonkit.triton_config import parse_text, to_text

    _, repository = gpu_family_repository
    report = check_repository(repository, "gpu")
    assert report.ok, report.errors
    assert not check_repository(repository, "cpu").ok  # KIND_GPU and non-Python backends
    configs = read_repository(repository)
    for name, config in configs.items():
        assert parse_text(to_text(config)) == config, name
    assert any(kinds(c) == {"KIND_GPU"} for c in configs.values())


def test_gpu_embedding_repository_uses_the_dali_and_onnxruntime_backends(gpu_family_repository):
    family, repository = gpu_family_repository
    if family not in EMBEDDING_FAMILIES:
        pytest.skip("the embedding families' layout")
    configs = read_repository(repository)
    check, preprocess = configs[f"{family}_image_check"], configs[f"{family}_image_preprocess"]
    assert (check.backend, kinds(check)) == ("python", {"KIND_CPU"})
    assert (preprocess.backend, kinds(preprocess)) == ("dali", {"KIND_GPU"})
    assert preprocess.input[0].name == "CHECKED_IMAGE" and preprocess.input[0].allow_ragged_batch
    assert (repository / f"{family}_image_preprocess" / "1" / "model.dali").stat().st_size > 0
    for encoder in (f"{family}_image_encoder", f"{family}_text_encoder"):
        assert (configs[encoder].backend, kinds(configs[encoder])) == ("onnxruntime", {"KIND_GPU"})
        assert (repository / encoder / "1" / "model.onnx").is_file()
    steps = [s.model_name for s in configs[f"{family}_image"].ensemble_scheduling.step]
    assert steps == [f"{family}_image_check", f"{family}_image_preprocess", f"{family}_image_encoder"]


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
        capture_output=True,
        text=True,
        timeout=120,
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


def run_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tritonkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_gpu_repositories_pass_check_for_the_gpu_target_and_round_trip(gpu_clip_repository, gpu_whisper_repository):
    from tritonkit.check import check_repository
    from tritonkit.triton_config import parse_text, to_text

    for repository in (gpu_clip_repository, gpu_whisper_repository):
        report = check_repository(repository, "gpu")
        assert report.ok, report.errors
        assert not check_repository(repository, "cpu").ok  # KIND_GPU and non-Python backends
        for name, config in read_repository(repository).items():
            assert parse_text(to_text(config)) == config, name
    encoder = read_repository(gpu_clip_repository)["clip_image_encoder"]
    assert encoder.model_warmup[0].inputs["PIXEL_VALUES"].zero_data


def test_onnxruntime_tensorrt_accelerator_is_configured(tiny_clip_dir, tmp_path):
    build("clip", str(tiny_clip_dir), tmp_path / "repo", options=BuildOptions(target="gpu", engine="onnxruntime-trt"))
    encoder = read_repository(tmp_path / "repo")["clip_text_encoder"]
    (accelerator,) = encoder.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP32"


def test_check_reports_broken_wiring_missing_files_and_unsuited_kinds(clip_repository, tmp_path):
    import shutil

    from tritonkit.check import check_repository
    from tritonkit.triton_config import read_config, write_config

    assert check_repository(clip_repository, "cpu").ok
    broken = tmp_path / "broken"
    shutil.copytree(clip_repository, broken)
    (broken / "clip_text_encoder" / "1" / "model.py").unlink()
    config = read_config(broken / "clip_image_encoder")
    config.input[0].dims[1] = 336  # the preprocessing makes 224
    write_config(config, broken / "clip_image_encoder")
    result = run_cli("check", str(broken))
    assert result.returncode == 2
    assert "clip_text_encoder: the python backend needs 1/model.py, which is missing" in result.stderr
    assert (
        "PIXEL_VALUES is TYPE_FP32[3, 224, 224] but clip_image_encoder.PIXEL_VALUES expects TYPE_FP32[3, 336, 224]"
        in result.stderr
    )


def test_tensorrt_commands_fail_fast_without_a_gpu(tiny_clip_dir, clip_repository, tmp_path):
    if has_gpu():
        pytest.skip("a GPU is present")
    for args in (
        ["engine", str(clip_repository / "clip_image_encoder" / "1" / "model.onnx"), "--out", str(tmp_path / "e")],
        [
            "build",
            "clip",
            "--model",
            str(tiny_clip_dir),
            "--out",
            str(tmp_path / "r"),
            "--target",
            "gpu",
            "--engine",
            "tensorrt",
        ],
    ):
        result = run_cli(*args)
        assert result.returncode == 2 and "TensorRT engines need an NVIDIA GPU" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_trtexec_equivalent_names_the_profile_and_precision(tmp_path):
    from tritonkit.tensorrt import EngineProfile, trtexec_command
    from tritonkit.triton_config import Tensor

    command = trtexec_command(
        tmp_path / "m.onnx",
        tmp_path / "m.plan",
        [Tensor("PIXEL_VALUES", "float32", (3, 224, 224))],
        EngineProfile(1, 8, 16),
        strongly_typed=True,
        fp16_flag=False,
        timing_cache=tmp_path / "t.cache",
    )
    assert "--minShapes=PIXEL_VALUES:1x3x224x224" in command and "--maxShapes=PIXEL_VALUES:16x3x224x224" in command
    assert "--stronglyTyped" in command and "--fp16" not in command


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tensorrt_plans_are_built_and_served(precision, tiny_clip_dir, tmp_path):
    """Never run here: builds engines with TensorRT and serves them on a GPU tritonserver."""
    from tritonkit.client import TritonkitClient
    from tritonkit.precision import PrecisionOptions

    result = build(
        "clip",
        str(tiny_clip_dir),
        tmp_path / "repo",
        options=BuildOptions(target="gpu", engine="tensorrt"),
        precision=PrecisionOptions(precision, "static"),
    )
    plans = list((result.out / "clip_image_encoder" / "1").glob("model.plan"))
    assert plans and (result.out / "clip_image_encoder" / "1" / "reproduce.sh").is_file()
    server = start_server(result.out)
    try:
        with TritonkitClient(server.grpc_url) as client:
            assert np.isfinite(client.embed_images([encode_image(random_image(240, 320), "JPEG")])).all()
    finally:
        server.stop()


def test_check_for_a_gpu_server_fails_on_a_cpu_repository_naming_the_models(clip_repository):
    from tritonkit.check import check_repository

    report = check_repository(clip_repository, "gpu")
    assert not report.ok
    flagged = {error.split(":")[0] for error in report.errors}
    assert flagged == {"clip_image_preprocess", "clip_image_encoder", "clip_text_encoder"}, report.errors
    assert not any("rebuild" in error for error in report.errors)  # said once, at the end
    result = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "check", str(clip_repository), "--target", "gpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 3, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        f"{clip_repository}: {len(report.models)} models checked: 3 error(s); the repository was built for CPU: "
        "rebuild it with --target gpu for a GPU server"
    )
    assert "Traceback" not in result.stderr
