"""The same command on the same inputs writes the same repository (issue: reproducible builds).

A second build runs without the export cache, so export, calibration, quantization and every
artefact are made again; the repositories must agree file by file. The one field allowed to
differ is `latency_ms` in accuracy_report.json: a timing taken during the build, reported and
never used to choose a variant."""

from __future__ import annotations

import json
from pathlib import Path

from tritonkit.build import build
from tritonkit.precision import PrecisionOptions


def files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
    }


def without_timings(report: dict) -> dict:
    return {
        **report,
        "reports": {v: {k: x for k, x in r.items() if k != "latency_ms"} for v, r in report["reports"].items()},
    }


def assert_same_repository(first: Path, second: Path) -> None:
    a, b = files(first), files(second)
    assert sorted(a) == sorted(b)
    for name in a:
        if Path(name).name == "accuracy_report.json":
            assert without_timings(json.loads(a[name].read_text())) == without_timings(
                json.loads(b[name].read_text())
            ), name
        else:
            assert a[name].read_bytes() == b[name].read_bytes(), f"{name} differs between the two builds"


def test_clip_int8_auto_rebuilt_without_the_cache_is_the_same_repository(tiny_clip_dir, tmp_path, monkeypatch):
    messages: list[str] = []
    first = build(
        "clip", str(tiny_clip_dir), tmp_path / "a", precision=PrecisionOptions("int8"), progress=messages.append
    )
    monkeypatch.setenv("TRITONKIT_CACHE_DIR", str(tmp_path / "empty_cache"))
    second = build("clip", str(tiny_clip_dir), tmp_path / "b", precision=PrecisionOptions("int8"))
    assert first.precision_variant == second.precision_variant == "int8-dynamic"  # the CPU preference
    assert (
        "using int8-dynamic (the first of int8-dynamic, int8-static on cpu that passes its accuracy report)" in messages
    )
    report = json.loads((tmp_path / "a" / "clip_image_encoder" / "1" / "accuracy_report.json").read_text())
    assert report["decision"] == {
        "rule": "the first of int8-dynamic, int8-static on cpu that passes its accuracy report",
        "order": ["int8-dynamic", "int8-static"],
        "passed": {"int8-dynamic": True, "int8-static": True},
    }
    assert_same_repository(tmp_path / "a", tmp_path / "b")


def test_whisper_int8_rebuilt_without_the_cache_is_the_same_repository(multilingual_whisper_dir, tmp_path, monkeypatch):
    """The tiny random Whisper (its calibration, quantization and report are what a real one's are;
    its random words miss the WER bound, so the build is forced and its report says so)."""
    options = PrecisionOptions("int8", "static", force=True)
    first = build("whisper", str(multilingual_whisper_dir), tmp_path / "a", precision=options)
    monkeypatch.setenv("TRITONKIT_CACHE_DIR", str(tmp_path / "empty_cache"))
    second = build("whisper", str(multilingual_whisper_dir), tmp_path / "b", precision=options)
    assert first.precision_variant == second.precision_variant == "int8-static"
    assert_same_repository(tmp_path / "a", tmp_path / "b")
