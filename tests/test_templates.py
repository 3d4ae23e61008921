"""The stages (what a repository's model.py files bind) are importable modules whose models share
the batched runtime; a repository's model.py is a binding of one, in the repository's format."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from tritonkit.batched_model import BatchedModel, concat_rows, split_rows, string_rows
from tritonkit.errors import InputError
from tritonkit.families import registry
from tritonkit.stages import stage_names

TEMPLATES = stage_names()


def test_every_template_defines_a_batched_triton_python_model():
    assert TEMPLATES
    for name in TEMPLATES:
        module = importlib.import_module(f"tritonkit.stages.{name}")
        assert issubclass(module.TritonPythonModel, BatchedModel), name


def test_every_template_is_used_by_a_registered_family(tiny_model_dir, tmp_path):
    from tritonkit.errors import InputError
    from tritonkit.families import get_family
    from tritonkit.families.base import BuildOptions

    used = set()
    for name in registry():
        spec = get_family(name)
        loaded = spec.load(str(tiny_model_dir(name)))
        onnx = {e.role: tmp_path / f"{e.role}.onnx" for e in spec.exports(loaded)}
        choices = [BuildOptions(), BuildOptions(preprocessing="python"), BuildOptions(target="gpu")]
        if "diarize" in {f.name for f in dataclasses.fields(spec.options_class)}:  # Whisper's NAME_diarize
            choices.append(BuildOptions(family=spec.options_class(diarize="resemblyzer")))
        for options in choices:
            try:
                pipelines = spec.pipelines(loaded, onnx, options)
            except InputError:  # a family that does not build for this target (Qwen-VL: CPU only)
                continue
            for pipeline in pipelines:
                stages = [*pipeline.stages, *(callee for stage in pipeline.stages for callee in stage.callees)]
                used |= {stage.template for stage in stages if stage.template}
    assert used == set(TEMPLATES)


def test_rows_split_back_per_request_when_batched():
    import numpy as np

    rows = [{"X": np.arange(2)}, {"X": np.arange(3) + 10}]
    batch = concat_rows(rows)
    parts = split_rows({"Y": batch["X"] * 2}, [2, 3])
    assert [p["Y"].tolist() for p in parts] == [[0, 2], [20, 22, 24]]


def test_string_rows_reject_text_when_not_utf8():
    import numpy as np

    assert string_rows(np.array([[b"caf\xc3\xa9"]], dtype=object), "TEXT") == ["café"]
    with pytest.raises(InputError, match="TEXT: not valid UTF-8"):
        string_rows(np.array([[b"\xff"]], dtype=object), "TEXT")
