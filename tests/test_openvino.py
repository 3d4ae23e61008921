"""OpenVINO as a CPU engine: FP32 that is FP32, NNCF INT8 and BF16 builds with their accuracy
reports, served on a real tritonserver; the native-backend flavour checked (it cannot be served
here: the bundled server has the Python backend only)."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from tests.conftest import encode_image, random_image, start_server
from tritonkit.accuracy import wer
from tritonkit.build import build
from tritonkit.check import check_repository
from tritonkit.client import TritonkitClient
from tritonkit.engines import OpenVinoSession, cpu_capabilities
from tritonkit.errors import InputError, ServerError
from tritonkit.families.base import BuildOptions
from tritonkit.precision import PrecisionOptions
from tritonkit.samples import SENTENCES
from tritonkit.server import TritonServer, free_port
from tritonkit.triton_config import parameter, read_config

OPENVINO = BuildOptions(engine="openvino")
NATIVE_BF16 = "BF16" in cpu_capabilities()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module", params=["fp32", "int8"])
def clip_openvino(request, tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"clip_openvino_{request.param}") / "repo"
    return build("clip", str(tiny_clip_dir), out, options=OPENVINO, precision=PrecisionOptions(request.param))


def test_openvino_build_ships_ir_with_its_engine_and_precision(clip_openvino):
    version = clip_openvino.out / "clip_image_encoder" / "1"
    assert {"model.xml", "model.bin"} <= {p.name for p in version.iterdir()}
    assert not (version / "model.onnx").exists()
    config = read_config(clip_openvino.out / "clip_image_encoder")
    assert parameter(config, "engine") == "openvino" and parameter(config, "model_file") == "model.xml"
    expected = "int8" if clip_openvino.precision_variant.startswith("int8") else "fp32"
    assert parameter(config, "inference_precision") == expected
    # FP32 means FP32: the session states its hint, whatever OpenVINO's default on this CPU
    session = OpenVinoSession(version / "model.xml", expected)
    assert session.property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    if expected == "int8":
        report = json.loads((version / "accuracy_report.json").read_text())
        assert report["chosen"] in ("int8-nncf", "int8-nncf-nosq")  # full INT8 holds for CLIP
        assert report["decision"]["order"] == ["int8-nncf", "int8-nncf-nosq", "int8-nncf-weights"]
        assert report["builtin_data"] and "built-in varied images" in report["data"]
        chosen = report["reports"][report["chosen"]]
        assert chosen["passed"] and chosen["graphs"]["image_encoder"]["min_cosine"] >= 0.99
        assert "FakeQuantize" in (version / "model.xml").read_text()  # NNCF's quantized graph
    else:
        export = json.loads((version / "export_report.json").read_text())
        assert export["passed"] and export["min_cosine"] > 0.9999  # the IR on OpenVINO vs PyTorch


@pytest.mark.server
def test_openvino_build_serves_embeddings_close_to_pytorch(clip_openvino, clip_loaded):
    import torch

    from tritonkit.families.clip import projected
    from tritonkit.preprocessing.dali import image_pixels

    spec, loaded = clip_loaded
    files = [encode_image(random_image(240, 320, seed=s), "JPEG") for s in range(4)]
    with torch.no_grad():
        pixels = torch.from_numpy(image_pixels(spec.image_recipe(loaded), files))
        want = projected(loaded.model.get_image_features(pixel_values=pixels)).numpy()
        texts = ["a photo of a cat", "a dog"]
        want_texts = spec.reference_text_embeds(loaded, texts)
    server = start_server(clip_openvino.out)
    try:
        with TritonkitClient(server.grpc_url) as client:
            got = client.embed_images(files, model="clip_image")
            got_texts = client.embed_texts(texts, model="clip_text")
    finally:
        server.stop()
    bound = 0.9999 if clip_openvino.precision_variant == "fp32" else 0.99
    assert cosine(got, want).min() > bound and cosine(got_texts, want_texts).min() > bound


def test_precision_and_engine_mismatches_fail_before_any_work(tiny_clip_dir, tmp_path):
    with pytest.raises(InputError, match="--precision bf16 runs on OpenVINO: add --engine openvino"):
        build("clip", str(tiny_clip_dir), tmp_path / "a", precision=PrecisionOptions("bf16"))
    with pytest.raises(InputError, match="--quantization nncf is for --engine openvino"):
        build("clip", str(tiny_clip_dir), tmp_path / "b", precision=PrecisionOptions("int8", "nncf"))
    with pytest.raises(InputError, match="--quantization static is for ONNX Runtime"):
        build(
            "clip", str(tiny_clip_dir), tmp_path / "c", options=OPENVINO, precision=PrecisionOptions("int8", "static")
        )
    with pytest.raises(InputError, match="--engine openvino is for --target cpu"):
        BuildOptions(target="gpu", engine="openvino")
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.skipif(NATIVE_BF16, reason="this CPU has native BF16: the BF16 build test runs instead")
def test_bf16_fails_at_once_on_a_cpu_without_native_bf16(tiny_clip_dir, tmp_path):
    with pytest.raises(InputError, match="this CPU has no native BF16") as caught:
        build("clip", str(tiny_clip_dir), tmp_path / "repo", options=OPENVINO, precision=PrecisionOptions("bf16"))
    assert "AVX-512 BF16 or AMX" in caught.value.hint and not (tmp_path / "repo").exists()


@pytest.mark.server
@pytest.mark.skipif(not NATIVE_BF16, reason="needs a CPU with native BF16 (AVX-512 BF16 or AMX)")
def test_bf16_build_reports_and_serves(tiny_clip_dir, clip_loaded, tmp_path):
    result = build("clip", str(tiny_clip_dir), tmp_path / "repo", options=OPENVINO, precision=PrecisionOptions("bf16"))
    assert result.precision_variant == "bf16" and result.accuracy["bf16"].passed
    config = read_config(result.out / "clip_text_encoder")
    assert parameter(config, "inference_precision") == "bf16"
    session = OpenVinoSession(result.out / "clip_text_encoder" / "1" / "model.xml", "bf16")
    assert session.property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    texts = ["a photo of a cat", "a dog"]
    spec, loaded = clip_loaded
    want = spec.reference_text_embeds(loaded, texts)
    server = start_server(result.out)
    try:
        with TritonkitClient(server.grpc_url) as client:
            got = client.embed_texts(texts, model="clip_text")
    finally:
        server.stop()
    assert cosine(got, want).min() > 0.995


@pytest.mark.server
@pytest.mark.skipif(not NATIVE_BF16, reason="needs a CPU with native BF16 (AVX-512 BF16 or AMX)")
def test_whisper_and_llava_bf16_builds_report_and_serve(
    whisper_dir, whisper_server, speech_files, tiny_llava_dir, tmp_path
):
    from tests.test_llava import NEW_TOKENS, image

    whisper = build("whisper", str(whisper_dir), tmp_path / "w", options=OPENVINO, precision=PrecisionOptions("bf16"))
    assert whisper.accuracy["bf16"].passed, whisper.accuracy["bf16"].summary()
    llava = build("llava", str(tiny_llava_dir), tmp_path / "l", options=OPENVINO, precision=PrecisionOptions("bf16"))
    assert llava.accuracy["bf16"].passed, llava.accuracy["bf16"].summary()
    servers = [start_server(whisper.out), start_server(llava.out)]
    try:
        with TritonkitClient(servers[0].grpc_url) as client:
            bf16 = [t.text for t in client.transcribe(speech_files)]
        with TritonkitClient(servers[1].grpc_url) as client:
            answer = client.chat(image(1), "What is in the picture?", max_new_tokens=NEW_TOKENS)
    finally:
        for server in servers:
            server.stop()
    with TritonkitClient(whisper_server.grpc_url) as client:
        fp32 = [t.text for t in client.transcribe(speech_files)]
    assert wer(SENTENCES, bf16) <= wer(SENTENCES, fp32) + 0.02, (fp32, bf16)
    assert answer


@pytest.mark.server
@pytest.mark.heavy  # NNCF on tiny.en, 2.5 minutes: scripts/heavy_tests.sh
def test_whisper_openvino_int8_keeps_wer_within_two_points_of_fp32(whisper_dir, whisper_server, speech_files, tmp_path):
    result = build("whisper", str(whisper_dir), tmp_path / "repo", options=OPENVINO, precision=PrecisionOptions("int8"))
    report = result.accuracy[result.precision_variant]
    assert report.passed and report.task["wer_increase"] <= 0.02, report.summary()
    for model, graph in (("whisper_encoder", "model.xml"), ("whisper_decoder", "step.xml")):
        assert (result.out / model / "1" / graph).is_file()
    assert parameter(read_config(result.out / "whisper_decoder"), "engine") == "openvino"
    server = start_server(result.out)
    try:
        with TritonkitClient(server.grpc_url) as client:
            int8 = [t.text for t in client.transcribe(speech_files)]
            timed = client.transcribe(speech_files[:1], timestamps=True)[0]
    finally:
        server.stop()
    with TritonkitClient(whisper_server.grpc_url) as client:
        fp32 = [t.text for t in client.transcribe(speech_files)]
    print(f"WER fp32 {wer(SENTENCES, fp32):.3f}, openvino {result.precision_variant} {wer(SENTENCES, int8):.3f}")
    assert wer(SENTENCES, int8) <= wer(SENTENCES, fp32) + 0.02, (fp32, int8)
    assert timed.segments and timed.segments[0].end > timed.segments[0].start


@pytest.mark.server
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_llava_openvino_vision_tower_serves(precision, tiny_llava_dir, llava_loaded, llava_repository, tmp_path):
    from tests.test_llava import NEW_TOKENS, image, reference_text

    result = build(
        "llava", str(tiny_llava_dir), tmp_path / "repo", options=OPENVINO, precision=PrecisionOptions(precision)
    )
    assert (result.out / "llava_vision_encoder" / "1" / "model.xml").is_file()
    if precision == "int8":
        assert result.accuracy[result.precision_variant].passed
    server = start_server(result.out)
    try:
        with TritonkitClient(server.grpc_url) as client:
            answers = [
                client.chat(image(seed), "What is in the picture?", max_new_tokens=NEW_TOKENS) for seed in (1, 2)
            ]
    finally:
        server.stop()
    if precision == "fp32":  # FP32 on OpenVINO: transformers' tokens exactly
        want = [
            reference_text(llava_loaded, llava_repository, image(seed), "What is in the picture?") for seed in (1, 2)
        ]
        assert answers == want
    else:
        assert all(answers), answers


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_native_backend_flavour_passes_check_and_refuses_the_bundled_server(engine, tiny_clip_dir, tmp_path):
    options = BuildOptions(engine=engine, native_backends=True)
    result = build("clip", str(tiny_clip_dir), tmp_path / "repo", options=options)
    for encoder in ("clip_image_encoder", "clip_text_encoder"):
        config = read_config(result.out / encoder)  # parses against Triton's schema
        assert config.backend == engine and not (result.out / encoder / "1" / "model.py").exists()
        threads = "INFERENCE_NUM_THREADS" if engine == "openvino" else "intra_op_thread_count"
        assert int(parameter(config, threads)) >= 1
    assert read_config(result.out / "clip_image_preprocess").backend == "python"
    native = check_repository(result.out, "cpu-native")
    assert native.ok, native.errors
    assert any("no FP32 precision hint" in w for w in native.warnings) == (engine == "openvino")
    bundled = check_repository(result.out, "cpu")
    assert any("not in the CPU server bundled here" in e for e in bundled.errors)
    server = TritonServer(result.out, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    with pytest.raises(ServerError, match=f"needs the {engine} backend"):
        server.start()
