"""`tritonkit build`: load, export, validate, and write the model repository."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tritonkit.errors import ExportError, InputError
from tritonkit.export import ValidationReport, export_onnx, validate_onnx
from tritonkit.families import get_family
from tritonkit.families.base import BuildOptions
from tritonkit.repository import BatchingOverrides, plan_models, staging_dir, write_models

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    out: Path
    models: list[str]
    reports: list[ValidationReport] = field(default_factory=list)


def build(
    family: str,
    model: str,
    out: Path,
    *,
    name: str | None = None,
    overrides: BatchingOverrides = BatchingOverrides(),
    options: BuildOptions = BuildOptions(),
    trust_remote_code: bool = False,
    progress: Progress = lambda message: None,
) -> BuildResult:
    spec = get_family(family)
    name = name or spec.name
    if not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    progress(f"loading {family} from {model}")
    loaded = spec.load(model, trust_remote_code=trust_remote_code)
    staging = staging_dir(out)
    try:
        onnx_files, reports = {}, []
        for export in spec.exports(loaded):
            progress(f"exporting {export.role} to ONNX")
            path = export_onnx(export, staging / "onnx" / export.role / "model.onnx")
            progress(f"validating {export.role} against PyTorch")
            report = validate_onnx(export, path)
            progress(report.summary())
            if not report.passed:
                raise ExportError(f"{report.summary()}: the ONNX export does not match PyTorch")
            report.write(path.with_name("export_report.json"))
            onnx_files[export.role] = path
            reports.append(report)
        progress(f"writing the {options.target} repository's pipelines ({options.preprocessing} preprocessing)")
        pipelines = spec.pipelines(loaded, onnx_files, staging / "assets", options)
        models = plan_models(name, pipelines, overrides)
        for m in models:  # the validation report travels with the encoder it validates
            onnx = m.files.get("model.onnx")
            if onnx is not None:
                m.files["export_report.json"] = Path(onnx).with_name("export_report.json")
        progress(f"writing {len(models)} models to {out}")
        names = write_models(models, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(Path(out), names, reports)
