"""`tritonkit build`: load, export, validate, and write the model repository."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tritonkit import export_cache
from tritonkit.errors import ExportError, InputError
from tritonkit.export import ValidationReport, export_onnx, validate_onnx
from tritonkit.families import get_family
from tritonkit.families.base import Artefact, BuildOptions, Pipeline
from tritonkit.precision import AccuracyReport, PrecisionOptions
from tritonkit.repository import BatchingOverrides, plan_models, release, staging_dir, write_models

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    out: Path
    models: list[str]
    reports: list[ValidationReport] = field(default_factory=list)
    accuracy: dict[str, AccuracyReport] = field(default_factory=dict)  # variant -> report
    precision_variant: str = "fp32"


def build(
    family: str,
    model: str,
    out: Path,
    *,
    name: str | None = None,
    overrides: BatchingOverrides = BatchingOverrides(),
    options: BuildOptions = BuildOptions(),
    precision: PrecisionOptions = PrecisionOptions(),
    trust_remote_code: bool = False,
    progress: Progress = lambda message: None,
) -> BuildResult:
    spec = get_family(family)
    spec.family_options(options)  # another family's options fail here, before any slow work
    if options.engine == "tensorrt":
        from tritonkit.tensorrt import require_gpu

        require_gpu()  # before any slow work
    precision.variants(options.engine)  # a precision the engine lacks fails here, before any slow work
    if precision.precision == "bf16":
        from tritonkit.engines import require_native_bf16

        require_native_bf16()
    name = name or spec.name
    if not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    staging = staging_dir(out)  # a bad --out fails here, before any slow work
    try:
        progress(f"loading {family} from {model}")
        spec.check_model_type(model)
        loaded = spec.load(model, trust_remote_code=trust_remote_code)
        for change in spec.fit(loaded, options):
            progress(change)
        onnx_files, reports, exports = {}, [], {}
        key = export_cache.export_key(model, family)
        for export in spec.exports(loaded):
            exports[export.role] = export
            path = staging / "onnx" / export.role / "model.onnx"
            if export_cache.fetch(key, export.role, path):
                report = ValidationReport.read(path.with_name("export_report.json"))
                report.tolerance_max_abs = export.tolerance.max_abs  # judged by today's tolerance
                report.tolerance_min_cosine = export.tolerance.min_cosine
                progress(f"reusing the cached export of {export.role}: {report.summary()}")
            else:
                progress(f"exporting {export.role} to ONNX")
                export_onnx(export, path)
                progress(f"validating {export.role} against PyTorch")
                report = validate_onnx(export, path)
                progress(report.summary())
                report.write(path.with_name("export_report.json"))
                export_cache.store(key, export.role, path)
            if not report.passed:
                raise ExportError(f"{report.summary()}: the ONNX export does not match PyTorch")
            onnx_files[export.role] = path
            reports.append(report)
        accuracy, variant = {}, "fp32"
        if precision.variants(options.engine):
            onnx_files, accuracy, variant = reduce_precision(
                spec, loaded, exports, onnx_files, precision, staging, progress, options
            )
        elif options.engine == "openvino":
            onnx_files, reports = openvino_graphs(exports, onnx_files, progress)
        options = dataclasses.replace(options, precision=variant)
        progress(f"describing the {options.target} repository's pipelines ({options.preprocessing} preprocessing)")
        pipelines = spec.pipelines(loaded, onnx_files, options)
        accuracy_file = staging / "onnx" / "accuracy_report.json" if accuracy else None
        pipelines = make_artefacts(pipelines, staging / "assets", staging / "onnx", accuracy_file, progress)
        models = plan_models(
            name, pipelines, overrides, options.max_request_bytes or spec.max_request_bytes, spec.memory_for(options)
        )
        progress(f"writing {len(models)} models to {out}")
        names = write_models(models, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        release(out)
    return BuildResult(Path(out), names, reports, accuracy, variant)


def report_name(graph_file: str) -> str:
    """Where a graph's export report goes: export_report.json beside model.onnx / model.plan,
    STEM.export_report.json beside any other graph (a model with several, e.g. step.onnx)."""
    stem = Path(graph_file).name.split(".")[0]
    return "export_report.json" if stem == "model" else f"{stem}.export_report.json"


def make_artefacts(
    pipelines: list[Pipeline], assets: Path, exports: Path, accuracy: Path | None, progress: Progress
) -> list[Pipeline]:
    """Make every stage's artefacts, each once and as its own printed step, and put each graph's
    export report (and the accuracy report) beside it: the pipelines then name only files that exist."""
    made: dict[Artefact, Mapping[str, Path]] = {}

    def resolve(stage):
        files: dict[str, Path] = dict(stage.files)
        for artefact in stage.artefacts:
            if artefact not in made:
                progress(f"{stage.role}: {artefact.what}")
                made[artefact] = artefact.make(assets / f"{len(made):02d}_{stage.role}")
            files.update(made[artefact])
        for graph_file, role in stage.graphs.items():
            files[report_name(graph_file)] = exports / role / "export_report.json"
            if accuracy is not None:
                files["accuracy_report.json"] = accuracy
        callees = tuple(resolve(callee) for callee in stage.callees)
        return dataclasses.replace(stage, files=files, artefacts=(), callees=callees)

    return [dataclasses.replace(p, stages=tuple(resolve(stage) for stage in p.stages)) for p in pipelines]


def openvino_graphs(exports, onnx_files, progress: Progress) -> tuple[dict[str, Path], list[ValidationReport]]:
    """FP32 on OpenVINO: every graph converted to IR and checked against PyTorch again, run by
    OpenVINO with its FP32 precision hint (its report replaces the ONNX one beside the graph)."""
    from tritonkit.engines import Runtime
    from tritonkit.precision import openvino_ir

    files, reports = {}, []
    for role, path in onnx_files.items():
        progress(f"converting {role} to OpenVINO IR")
        ir = Path(path).with_name("model.openvino.xml")
        openvino_ir(Path(path), ir)
        report = validate_onnx(exports[role], ir, Runtime("openvino"))
        progress(f"on OpenVINO: {report.summary()}")
        if not report.passed:
            raise ExportError(f"{report.summary()}: OpenVINO's FP32 result does not match PyTorch")
        report.write(Path(path).with_name("export_report.json"))
        files[role] = ir
        reports.append(report)
    return files, reports


def reduce_precision(
    spec,
    loaded,
    exports,
    onnx_files,
    precision: PrecisionOptions,
    staging: Path,
    progress: Progress,
    options: BuildOptions = BuildOptions(),
):
    """Build each requested variant of every graph, judge it as the engine will run it, and keep
    the preferred one that passes (`tritonkit.precision.choose`)."""
    import json

    from tritonkit.precision import choose, convert, evaluate

    progress("preparing calibration and held-out data")
    data = spec.precision_data(loaded, exports, onnx_files, precision.calibration_data)
    if data.builtin:
        from tritonkit.calibration import BUILTIN_NOTE

        progress(f"warning: the accuracy gate measures {BUILTIN_NOTE}")
    thresholds = dict(spec.precision_thresholds.get(precision.precision, {}))
    if precision.min_cosine is not None:
        thresholds["min_cosine"] = precision.min_cosine
    if precision.max_wer_increase is not None:
        thresholds["max_wer_increase"] = precision.max_wer_increase
    task_check = spec.task_check(loaded, data, onnx_files)
    files: dict[str, dict[str, Path]] = {}
    reports: dict[str, AccuracyReport] = {}
    for variant in precision.variants(options.engine):
        files[variant] = {}
        for role, fp32 in onnx_files.items():
            if role in spec.full_precision_roles:
                files[variant][role] = Path(fp32)
                continue
            progress(f"converting {role} to {variant}")
            files[variant][role] = convert(
                Path(fp32),
                Path(fp32).with_name(f"model.{variant}.onnx"),
                variant,
                data.calibration.get(role, []),
                precision.calibration_method,
                weights_only=role in spec.int8_weights_only,
                reduce_range=spec.int8_reduce_range,
            )
        progress(f"measuring {variant} against FP32 on held-out data ({data.source})")
        judged = {role: export for role, export in exports.items() if role not in spec.full_precision_roles}
        reports[variant] = evaluate(variant, judged, files[variant], data, thresholds, task_check, options.engine)
        progress(reports[variant].summary())
    decision = choose(reports, precision.force, "openvino" if options.engine == "openvino" else options.target)
    chosen = decision.chosen
    summary = {
        "chosen": chosen,
        "data": data.source,
        "builtin_data": data.builtin,
        "decision": {"rule": decision.rule, "order": list(decision.order), "passed": decision.passed},
        # latency_ms in each report is a timing taken here: informational, never used to choose,
        # and the only field that differs between two builds of the same inputs
        "reports": {v: {**r.__dict__, "passed": r.passed} for v, r in reports.items()},
    }
    (staging / "onnx" / "accuracy_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not reports[chosen].passed:
        progress(f"warning: {chosen} failed its accuracy report; kept because of --force")
    progress(decision.summary())
    return files[chosen], reports, chosen
