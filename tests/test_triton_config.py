"""Configs come from the protobuf schema and round-trip through the parser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tritonkit.errors import ConfigError
from tritonkit.repository import list_models, read_repository
from tritonkit.triton_config import (
    Batching,
    EnsembleStep,
    Tensor,
    ensemble_config,
    model_config,
    parse_text,
    to_text,
    warmup,
)


def test_config_round_trips_when_written_and_parsed_again():
    config = model_config(
        "m",
        [Tensor("IMAGE", "uint8", (-1,), ragged=True)],
        [Tensor("OUT", "float32", (3, 4))],
        Batching(max_batch_size=8, preferred_batch_sizes=(2, 4, 32), max_queue_delay_us=500, instances=2),
        {"key": "value"},
    )
    parsed = parse_text(to_text(config))
    assert parsed == config
    assert parsed.input[0].allow_ragged_batch
    assert list(parsed.dynamic_batching.preferred_batch_size) == [2, 4]  # 32 > max_batch_size is dropped
    assert parsed.instance_group[0].count == 2
    assert parsed.parameters["key"].string_value == "value"


def test_repository_round_trips_when_built(clip_repository):
    configs = read_repository(clip_repository)
    assert set(configs) == {
        "clip_image",
        "clip_image_preprocess",
        "clip_image_encoder",
        "clip_text",
        "clip_text_tokenizer",
        "clip_text_encoder",
    }
    for name, config in configs.items():
        text = (clip_repository / name / "config.pbtxt").read_text()
        assert text_format.MessageToString(config) == text
        assert config.name == name
    image = configs["clip_image"]
    assert image.platform == "ensemble" and image.max_batch_size > 0
    assert [s.model_name for s in image.ensemble_scheduling.step] == ["clip_image_preprocess", "clip_image_encoder"]
    assert configs["clip_image_preprocess"].input[0].allow_ragged_batch
    assert configs["clip_image_encoder"].output[0].dims == [32]


def test_parser_reports_the_file_when_config_is_invalid(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\nnot_a_field: 3\n')
    assert list_models(tmp_path) == ["broken"]
    with pytest.raises(ConfigError, match=r"broken/config\.pbtxt"):
        read_repository(tmp_path)


@pytest.mark.parametrize(
    "kwargs", [dict(dtype="complex64", dims=(1,)), dict(dtype="float32", dims=(0,)), dict(dtype="float32", dims=(-2,))]
)
def test_tensor_is_rejected_when_dtype_or_dims_invalid(kwargs):
    with pytest.raises(ConfigError):
        Tensor("X", **kwargs)


def test_batching_is_rejected_when_values_invalid():
    with pytest.raises(ConfigError):
        Batching(max_batch_size=0)
    with pytest.raises(ConfigError):
        Batching(instances=0)
    assert Batching().override(instances=3, max_batch_size=None).instances == 3


# Golden files: what the generator writes, compared as text with files written once by hand-checked
# runs (as pytriton's tests keep them). Regenerate after an intended change with
# TRITONKIT_REGENERATE_GOLDEN=1 and review the diff.
GOLDEN = Path(__file__).parent / "golden"


def golden_configs() -> dict[str, model_config_pb2.ModelConfig]:
    image = Tensor("IMAGE", "uint8", (-1,), ragged=True)
    language = Tensor("LANGUAGE", "string", (1,), optional=True)
    pixels = Tensor("PIXEL_VALUES", "float32", (3, 224, 224))
    embeds = Tensor("IMAGE_EMBEDS", "float32", (512,))
    batching = Batching(max_batch_size=16, preferred_batch_sizes=(4, 8, 16), max_queue_delay_us=2000, instances=2)
    return {
        "python_model": model_config(
            "clip_image_preprocess",
            [image, language],
            [pixels],
            batching,
            {"image_recipe": '{"crop_height": 224}', "max_request_bytes": "67108864"},
        ),
        "gpu_encoder": model_config(
            "clip_image_encoder",
            [pixels],
            [embeds],
            batching,
            backend="onnxruntime",
            kind="KIND_GPU",
            extra={
                **warmup([pixels]),
                "optimization": {
                    "execution_accelerators": {
                        "gpu_execution_accelerator": [{"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}]
                    }
                },
            },
        ),
        "decoupled_decoder": model_config(
            "llava_decoder_stream",
            [Tensor("PROMPT", "string", (1,))],
            [Tensor("TEXT", "string", (1,))],
            Batching(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=5000),
            extra={"model_transaction_policy": {"decoupled": True}},
        ),
        "ensemble": ensemble_config(
            "clip_image",
            [image],
            [embeds],
            16,
            [
                EnsembleStep("clip_image_preprocess", {"IMAGE": "IMAGE"}, {"PIXEL_VALUES": "PIXEL_VALUES"}),
                EnsembleStep("clip_image_encoder", {"PIXEL_VALUES": "PIXEL_VALUES"}, {"IMAGE_EMBEDS": "IMAGE_EMBEDS"}),
            ],
            response_cache=True,
        ),
    }


@pytest.mark.parametrize("name", sorted(golden_configs()))
def test_generated_config_equals_its_golden_file(name):
    text = to_text(golden_configs()[name])
    path = GOLDEN / f"{name}.pbtxt"
    if os.environ.get("TRITONKIT_REGENERATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name}: the generated config changed; see {path}"
    assert parse_text(path.read_text()) == golden_configs()[name]  # and the golden file parses back to it
