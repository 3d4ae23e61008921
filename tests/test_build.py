"""Building: validation against PyTorch, kept models, and failures that leave the repository intact."""

from __future__ import annotations

import json

import pytest

from tritonkit.build import build
from tritonkit.errors import ExportError, ModelSourceError
from tritonkit.families import family_names
from tritonkit.families.base import Tolerance
from tritonkit.families.clip import ClipSpec
from tritonkit.repository import BatchingOverrides, list_models, read_repository


def test_build_records_the_measured_error_when_export_is_validated(clip_repository):
    report = json.loads((clip_repository / "clip_image_encoder" / "1" / "export_report.json").read_text())
    assert report["passed"] is True
    assert 0 <= report["max_abs_error"] <= report["tolerance_max_abs"]
    assert report["min_cosine"] >= 0.9999
    assert report["batch_sizes"] == [2, 1, 5]


def test_build_keeps_existing_models_when_a_second_name_is_added(tiny_clip_dir, clip_repository, tmp_path):
    out = tmp_path / "repo"
    build("clip", str(tiny_clip_dir), out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("config.pbtxt")}
    build("clip", str(tiny_clip_dir), out, name="clip2", overrides=BatchingOverrides(instances=2, max_batch_size=4))
    models = list_models(out)
    assert "clip_image" in models and "clip2_image" in models and len(models) == 12
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    configs = read_repository(out)
    assert configs["clip2_image_encoder"].instance_group[0].count == 2
    assert configs["clip2_image"].max_batch_size == 4
    assert configs["clip_image_encoder"].instance_group[0].count == 1
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


def test_build_fails_and_keeps_the_repository_when_export_misses_tolerance(tiny_clip_dir, tmp_path, monkeypatch):
    out = tmp_path / "repo"
    build("clip", str(tiny_clip_dir), out)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    impossible = Tolerance(max_abs=0.0, min_cosine=1.0)
    monkeypatch.setattr(ClipSpec, "tolerances", {"image_encoder": impossible, "text_encoder": impossible})
    with pytest.raises(ExportError, match=r"max abs error .* \(limit 0\).*does not match PyTorch"):
        build("clip", str(tiny_clip_dir), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


def test_build_names_the_problem_when_model_directory_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        build("clip", str(tmp_path / "empty"), tmp_path / "out")


def test_build_gives_a_clear_error_when_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="cannot be reached to fetch it as a Hub id"):
        build("clip", "openai/clip-vit-base-patch32-not-cached", tmp_path / "out")


def test_build_rejects_the_name_when_it_is_not_a_plain_identifier(tiny_clip_dir, tmp_path):
    from tritonkit.errors import InputError

    with pytest.raises(InputError, match=r"--name '\.\./evil'"):
        build("clip", str(tiny_clip_dir), tmp_path / "out", name="../evil")


def test_rebuild_reuses_cached_exports_and_writes_identical_configs(tiny_clip_dir, tmp_path, export_cache_dir):
    from tritonkit.build import build
    from tritonkit.repository import read_repository

    messages: list[str] = []
    first = build("clip", str(tiny_clip_dir), tmp_path / "a")
    build("clip", str(tiny_clip_dir), tmp_path / "b", progress=messages.append)
    assert sum("reusing the cached export" in m for m in messages) == 2, messages
    assert not any(m.startswith("exporting") for m in messages)
    a, b = read_repository(first.out), read_repository(tmp_path / "b")
    assert {n: str(c) for n, c in a.items()} == {n: str(c) for n, c in b.items()}
    for model in ("clip_image_encoder", "clip_text_encoder"):
        assert (first.out / model / "1" / "model.onnx").read_bytes() == (
            tmp_path / "b" / model / "1" / "model.onnx"
        ).read_bytes()


def test_changed_model_files_are_exported_again(tiny_clip_dir, tmp_path):
    import shutil

    from tritonkit.build import build

    copy = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, copy)
    build("clip", str(copy), tmp_path / "a")
    config = copy / "config.json"
    config.write_text(config.read_text().replace("\n", "\n ", 1))  # same model, different bytes
    messages: list[str] = []
    build("clip", str(copy), tmp_path / "b", progress=messages.append)
    assert sum(m.startswith("exporting") for m in messages) == 2


@pytest.mark.parametrize("family", family_names())
def test_every_graph_ships_its_own_export_report(family, family_repository):
    """Each graph's report goes beside it (once, the Whisper decoder shipped its cross-attention
    graph's report for its step graph too)."""
    from tritonkit.build import report_name
    from tritonkit.repository import read_repository

    repository = family_repository(family)
    graphs = 0
    for name in read_repository(repository):
        version = repository / name / "1"
        for graph in sorted(version.glob("*.onnx")):
            if graph.name == "silero_vad.onnx":  # copied from faster-whisper's wheel, not exported here
                continue
            report = json.loads((version / report_name(graph.name)).read_text())
            assert report["passed"]
            graphs += 1
            expected_role = {"cross_kv.onnx": "decoder_cross_kv", "step.onnx": "decoder_step"}.get(graph.name)
            if expected_role:
                assert report["role"] == expected_role, (name, graph.name, report["role"])
    assert graphs


@pytest.mark.parametrize("source", ["demo/tiny-clp", "models/clip/v1"])
def test_a_path_like_model_that_does_not_exist_is_never_sent_to_the_hub(source, tmp_path, monkeypatch):
    """ "demo/tiny-clp" beside a demo/ folder is a typo of a path, not a Hub id: an immediate error."""
    import time

    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    began = time.monotonic()
    with pytest.raises(ModelSourceError, match=f"--model {source}: no such directory"):
        build("clip", source, tmp_path / "out")
    assert time.monotonic() - began < 10  # no Hub retries


def test_a_hub_id_without_a_reachable_hub_fails_at_once_naming_both_readings(tmp_path):
    """ "demo/tiny-clp" without a demo/ folder reads as a Hub id too; with no Hub to reach (here an
    endpoint whose port refuses connections) the command says so at once, instead of after
    huggingface_hub's five retries (about 30 s)."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    began = time.monotonic()
    command = ["build", "clip", "--model", "demo/tiny-clp", "--out", str(tmp_path / "o")]
    result = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    seconds = time.monotonic() - began
    assert result.returncode == 2, result.stderr
    assert (
        "--model demo/tiny-clp: no such directory here, and the Hugging Face Hub (http://127.0.0.1:9)" in result.stderr
    )
    assert "fix the path" in result.stderr and "Retrying" not in result.stderr and "Traceback" not in result.stderr
    assert seconds < 20, seconds  # the import of torch and transformers, then one refused connection


def test_a_repository_says_its_format_and_its_model_py_files_bind_the_installed_stages(clip_repository):
    from tritonkit.repository_format import FORMAT, FORMAT_PARAMETER
    from tritonkit.stages import stage_names
    from tritonkit.triton_config import parameter

    for name, config in read_repository(clip_repository).items():
        assert parameter(config, FORMAT_PARAMETER) == str(FORMAT), name
        source = clip_repository / name / "1" / "model.py"
        if config.backend == "python":
            stage = parameter(config, "tritonkit_template")
            assert stage in stage_names(), name
            text = source.read_text()
            assert f"from tritonkit.stages.{stage} import TritonPythonModel" in text and len(text.splitlines()) <= 5


def test_a_repository_of_another_format_is_refused_naming_the_models_and_the_fix(clip_repository, tmp_path):
    """Where it would be served: `tritonkit serve` and `check` before any server starts, a stage at
    load (a server started some other way), the OpenAI gateway for its ensembles."""
    import shutil
    import subprocess
    import sys

    from tritonkit.check import check_repository
    from tritonkit.errors import TritonkitError
    from tritonkit.gateway.triton import classify
    from tritonkit.repository_format import FORMAT_PARAMETER
    from tritonkit.server import TritonServer
    from tritonkit.triton_config import read_config, write_config

    copy = tmp_path / "repository"
    shutil.copytree(clip_repository, copy)
    for stale in ("clip_image_encoder", "clip_image"):
        config = read_config(copy / stale)
        config.parameters[FORMAT_PARAMETER].string_value = "1"
        write_config(config, copy / stale)
    fix = "rebuild it with tritonkit build"
    expected = (
        "clip_image, clip_image_encoder: written in tritonkit repository format 1, and this tritonkit serves format"
    )
    with pytest.raises(TritonkitError, match=expected) as refused:
        TritonServer(copy).start()
    assert fix in str(refused.value)
    served = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "serve", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert served.returncode == 2 and expected in served.stderr and fix in served.stderr
    assert "Traceback" not in served.stderr and len(served.stderr.strip().splitlines()) == 1
    errors = check_repository(copy).errors
    assert sum("written in tritonkit repository format 1" in e for e in errors) == 2

    from tritonkit.stages.onnx_encoder import TritonPythonModel

    args = {
        "model_config": json.dumps(_as_json(copy / "clip_image_encoder")),
        "model_name": "clip_image_encoder",
        "model_repository": str(copy / "clip_image_encoder"),
        "model_version": "1",
    }
    with pytest.raises(TritonkitError, match=f"clip_image_encoder: written in .* format 1.*{fix}"):
        TritonPythonModel().initialize(args)
    models = classify({name: _as_json(copy / name) for name in ("clip_image", "clip_text")}, set())
    assert "format 1" in (models["clip"].stale or "") and fix in (models["clip"].stale or "")


def _as_json(model_dir) -> dict:
    """A model's config as Triton gives it to a stub and to clients (JSON)."""
    from google.protobuf.json_format import MessageToDict

    from tritonkit.triton_config import read_config

    return MessageToDict(read_config(model_dir), preserving_proto_field_name=True)
