"""The family registry, and one test row per registered family."""

from __future__ import annotations

import pytest

from tritonkit.errors import ConfigError, UnknownFamilyError
from tritonkit.families import get_family, registry
from tritonkit.families.base import FamilySpec, Pipeline, Stage, register
from tritonkit.triton_config import Batching, Tensor

# Every registered family needs a row: (family, ensemble roles it serves).
FAMILY_ROWS = {
    "clip": {"image", "text"},
    "llava": {"chat", "chat_stream"},
    "whisper": {""},
}


def test_every_registered_family_has_a_test_row():
    assert set(registry()) == set(FAMILY_ROWS)


@pytest.mark.parametrize("loaded_fixture", ["clip_loaded", "llava_loaded", "whisper_loaded"])
def test_family_serves_its_ensembles_when_built(loaded_fixture, request, tmp_path):
    spec, loaded = request.getfixturevalue(loaded_fixture)
    onnx_files = {e.role: tmp_path / f"{e.role}.onnx" for e in spec.exports(loaded)}
    pipelines = spec.pipelines(loaded, onnx_files, tmp_path)
    assert {p.role for p in pipelines} == FAMILY_ROWS[spec.name]


def test_get_family_names_the_choices_when_unknown():
    with pytest.raises(UnknownFamilyError, match="choose one of: clip, llava, whisper"):
        get_family("siglip-nope")


def test_register_rejects_a_second_family_with_the_same_name():
    class Impostor(FamilySpec):
        name = "clip"

    with pytest.raises(ValueError, match="registered twice"):
        register(Impostor)


def test_pipeline_is_rejected_when_a_stage_input_is_never_produced():
    x, y = Tensor("X", "float32", (2,)), Tensor("Y", "float32", (2,))
    stage = Stage("s", "onnx_encoder", inputs=(y,), outputs=(x,), batching=Batching())
    with pytest.raises(ConfigError, match="needs Y"):
        Pipeline("p", inputs=(x,), outputs=(x,), stages=(stage,))


def test_pipeline_is_rejected_when_dims_disagree_between_stages():
    x, x3 = Tensor("X", "float32", (2,)), Tensor("X", "float32", (3,))
    stage = Stage("s", "onnx_encoder", inputs=(x3,), outputs=(x3,), batching=Batching())
    with pytest.raises(ConfigError, match="expects float32\\[3\\]"):
        Pipeline("p", inputs=(x,), outputs=(x3,), stages=(stage,))
