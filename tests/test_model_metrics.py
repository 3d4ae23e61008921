"""Our Python-backend models' own metrics, scraped from a real tritonserver's /metrics."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from tests.conftest import encode_image, random_image, start_server
from tritonkit.client import TritonkitClient, pack_byte_rows
from tritonkit.errors import InferenceError

pytestmark = pytest.mark.server


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample on the server's /metrics: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_preprocessing_models_report_time_input_bytes_and_rejections_by_reason(clip_repository):
    images = [encode_image(random_image(80 + 20 * i, 90, seed=i), "JPEG") for i in range(3)]
    bad = {"empty": b"", "undecodable": b"%PDF-1.4 not an image"}
    server = start_server(clip_repository)
    try:
        with TritonkitClient(server.grpc_url) as client:
            for image in images:
                client.embed_images([image])
            for data in bad.values():
                with pytest.raises(InferenceError):
                    client.infer(
                        "clip_image", {"IMAGE": pack_byte_rows([data]) if data else np.zeros((1, 0), np.uint8)}
                    )
            client.embed_texts(["a cat", "a dog on a sofa"])
            with pytest.raises(InferenceError, match="not valid UTF-8"):
                client.infer("clip_text", {"TEXT": np.array([[b"\xff\xfe bad"]], dtype=object)})
        samples = scrape(server)
    finally:
        server.stop()
    image_model = {"model": "clip_image_preprocess"}
    assert value(samples, "tritonkit_preprocess_seconds_count", **image_model) == 5
    assert 0 < value(samples, "tritonkit_preprocess_seconds_sum", **image_model) < 60
    assert value(samples, "tritonkit_input_bytes_count", input="IMAGE", **image_model) == 5
    assert value(samples, "tritonkit_input_bytes_sum", input="IMAGE", **image_model) == sum(map(len, images)) + len(
        bad["undecodable"]
    )
    for reason in bad:
        assert value(samples, "tritonkit_rejected_inputs_total", reason=reason, **image_model) == 1, reason
    tokenizer = {"model": "clip_text_tokenizer"}
    assert value(samples, "tritonkit_preprocess_seconds_count", **tokenizer) == 2  # one request of two texts, one bad
    assert (
        value(samples, "tritonkit_input_bytes_sum", input="TEXT", **tokenizer)
        == len("a cat") + len("a dog on a sofa") + 6
    )
    assert value(samples, "tritonkit_rejected_inputs_total", reason="bad_text", **tokenizer) == 1
    # histogram buckets are cumulative and end at the count
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "tritonkit_preprocess_seconds_bucket" and dict(labels)["model"] == "clip_image_preprocess"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1] == (float("inf"), 5)


def test_decoder_reports_generated_tokens_and_decode_steps(whisper_repository, speech_files):
    server = start_server(whisper_repository)
    try:
        with TritonkitClient(server.grpc_url) as client:
            transcripts = client.transcribe(speech_files[:2])
            with pytest.raises(InferenceError):
                client.transcribe([speech_files[0]], language="fr")
        samples = scrape(server)
    finally:
        server.stop()
    tokens = sum(len(t.tokens) for t in transcripts)
    decoder = {"model": "whisper_decoder"}
    assert tokens > 10
    assert value(samples, "tritonkit_generated_tokens_total", **decoder) == tokens
    assert value(samples, "tritonkit_decode_steps_count", **decoder) == 2
    # one step per token, plus the step that produced each window's end token
    assert value(samples, "tritonkit_decode_steps_sum", **decoder) == tokens + 2
    preprocess = {"model": "whisper_audio_preprocess"}
    assert value(samples, "tritonkit_rejected_inputs_total", reason="bad_option", **preprocess) == 1
    assert value(samples, "tritonkit_input_bytes_sum", input="AUDIO", **preprocess) == len(speech_files[0]) * 2 + len(
        speech_files[1]
    )


def test_tracemalloc_attributes_each_stubs_python_allocations(clip_repository, monkeypatch):
    """TRITONKIT_TRACEMALLOC: each stub reports its traced Python allocations beside its resident
    memory (the rest is native: ONNX Runtime's arena, DALI)."""
    monkeypatch.setenv("TRITONKIT_TRACEMALLOC", "1")
    server = start_server(clip_repository)
    try:
        with TritonkitClient(server.grpc_url) as client:
            client.embed_images([encode_image(random_image(120, 90), "JPEG")])
        samples = scrape(server)
    finally:
        server.stop()
    stub = value(
        samples,
        "tritonkit_resident_bytes",
        model="clip_image_encoder",
        instance="clip_image_encoder_0_0",
        process="stub",
    )
    traced = value(
        samples, "tritonkit_python_traced_bytes", model="clip_image_encoder", instance="clip_image_encoder_0_0"
    )
    assert 0 < traced < stub


def test_metrics_reported_from_many_threads_at_once_all_count_and_the_server_lives(tmp_path):
    """The decoders report from their step loop's thread and worker threads at once; the Python
    backend's metrics are not thread-safe (2.51 segfaulted under concurrent word-timestamp
    requests), so every report of a stub takes one lock."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from tests.triton_models.metrics_threads import THREADS
    from tritonkit.triton_config import Batching, Tensor, model_config, write_config

    name = "metrics_threads"
    config = model_config(
        name, (Tensor("VALUE", "int32", (1,)),), (Tensor("DOUBLED", "int32", (1,)),), Batching(max_batch_size=4)
    )
    (tmp_path / name / "1").mkdir(parents=True)
    write_config(config, tmp_path / name)
    shutil.copy(Path(__file__).parent / "triton_models" / f"{name}.py", tmp_path / name / "1" / "model.py")
    server = start_server(tmp_path)
    reports, requests = 400, 6
    try:
        with TritonkitClient(server.grpc_url) as client, ThreadPoolExecutor(requests) as pool:
            answers = list(
                pool.map(
                    lambda _: client.infer(name, {"VALUE": np.array([[reports]], dtype=np.int32)}), range(requests)
                )
            )
        samples = scrape(server)
    finally:
        server.stop()
    assert [int(a["DOUBLED"][0, 0]) for a in answers] == [2 * reports] * requests
    assert server.process.returncode in (0, None) and not server.error_lines()
    assert value(samples, "tritonkit_generated_tokens_total", model=name) == THREADS * reports * requests
    assert value(samples, "tritonkit_decode_steps_count", model=name) == THREADS * reports * requests
