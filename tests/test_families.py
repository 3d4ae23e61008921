"""The family registry, and one test row per registered family."""

from __future__ import annotations

import pytest

from tritonkit.errors import ConfigError, UnknownFamilyError
from tritonkit.families import family_names, get_family, registry
from tritonkit.families.base import BuildOptions, FamilySpec, Pipeline, Stage, register
from tritonkit.triton_config import Batching, Tensor

# Every registered family needs a row: the ensemble roles it serves. The other tests take their
# family lists from the registry (tests.conftest.EMBEDDING_FAMILIES, family_names()).
FAMILY_ROWS = {
    "clip": {"image", "text"},
    "llava": {"chat", "chat_stream", "chat_text", "chat_text_stream"},
    "metaclip2": {"image", "text"},
    "qwen2vl": {"chat", "chat_stream", "chat_text", "chat_text_stream"},
    "qwen2_5vl": {"chat", "chat_stream", "chat_text", "chat_text_stream"},
    "siglip": {"image", "text"},
    "speaker": {"audio"},
    "whisper": {"", "stream"},
}


def test_every_registered_family_has_a_test_row():
    assert set(registry()) == set(FAMILY_ROWS)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    loaded: dict[str, tuple] = {}

    def get(family: str):
        if family not in loaded:
            spec = get_family(family)
            loaded[family] = (spec, spec.load(str(tiny_model_dir(family))))
        return loaded[family]

    return get


@pytest.mark.parametrize("family", family_names())
def test_family_serves_its_ensembles_when_built(family, tiny_loaded, tmp_path):
    spec, loaded = tiny_loaded(family)
    onnx_files = {e.role: tmp_path / f"{e.role}.onnx" for e in spec.exports(loaded)}
    assert {e.role for e in spec.exports(loaded)} == set(spec.tolerances)  # one tolerance per export
    pipelines = spec.pipelines(loaded, onnx_files)
    assert {p.role for p in pipelines} == FAMILY_ROWS[spec.name]


@pytest.mark.parametrize("family", family_names())
def test_every_ensemble_speaks_its_familys_contract(family, tiny_loaded, tmp_path):
    """An ensemble takes and gives only its contract's tensors, in the contract's dtypes, and the
    gateway finds each of them in the role its name says."""
    from tritonkit.contracts import TENSORS
    from tritonkit.gateway.triton import classify

    spec, loaded = tiny_loaded(family)
    onnx_files = {e.role: tmp_path / f"{e.role}.onnx" for e in spec.exports(loaded)}
    contract, configs = spec.contract, {}
    for pipeline in spec.pipelines(loaded, onnx_files):
        for tensor, declared in [(t, contract.inputs) for t in pipeline.inputs] + [
            (t, contract.outputs) for t in pipeline.outputs
        ]:
            assert tensor.name in declared and tensor.dtype == TENSORS[tensor.name].dtype, (pipeline.role, tensor)
        name = "m" + (f"_{pipeline.role}" if pipeline.role else "")
        configs[name] = {
            "platform": "ensemble",
            "input": [{"name": t.name} for t in pipeline.inputs],
            "output": [{"name": t.name} for t in pipeline.outputs],
        }
    (served,) = classify(configs, set(configs)).values()
    assert served.kind == contract.kind and set(served.ensembles.values()) == set(configs)


@pytest.mark.parametrize("family", family_names())
def test_every_python_stage_has_its_familys_memory_figure(family, tiny_loaded, tmp_path):
    """`tritonkit plan` charges a Python-backend stub its family's measured fixed memory: every
    stage a build can write has one (CPU with DALI or Python preprocessing, GPU)."""
    spec, loaded = tiny_loaded(family)
    onnx_files = {e.role: tmp_path / f"{e.role}.onnx" for e in spec.exports(loaded)}
    for options in (BuildOptions(), BuildOptions(preprocessing="python"), BuildOptions(target="gpu")):
        memory = spec.memory_for(options)
        stages = [s for p in spec.pipelines(loaded, onnx_files, options) for s in p.stages]
        stages += [callee for s in stages for callee in s.callees]
        unmeasured = {s.role for s in stages if s.template is not None and s.role not in memory}
        assert not unmeasured, (options.target, options.preprocessing, unmeasured)


@pytest.mark.parametrize("family", family_names())
def test_make_tiny_writes_a_model_its_family_loads(family, tiny_loaded):
    spec, loaded = tiny_loaded(family)
    assert type(loaded) is spec.loaded_class and loaded.model.__class__.__name__ == spec.model_class


def test_get_family_names_the_choices_when_unknown():
    with pytest.raises(UnknownFamilyError, match="choose one of: " + ", ".join(family_names())):
        get_family("nope")


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
