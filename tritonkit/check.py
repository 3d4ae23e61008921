"""`tritonkit check`: validate a model repository without loading it.

Every config must parse against Triton's schema; every ensemble step must name a model that
exists and connect by tensor name with matching dtype and dims; each backend's files must be
present; instance kinds must suit the target (a CPU repository has no KIND_GPU and only backends
the CPU server has).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from tritonkit.errors import ConfigError
from tritonkit.repository import TEMPLATE_PARAMETER, VERSION, list_models
from tritonkit.repository_format import FORMAT_PARAMETER, REBUILD_HINT, format_error
from tritonkit.triton_config import parameter, read_config

REQUIRED_FILES = {
    "python": "model.py",
    "dali": "model.dali",
    "onnxruntime": "model.onnx",
    "tensorrt": "model.plan",
    "openvino": "model.xml",
}
CPU_BACKENDS = {"python", ""}
# target cpu-native: a CPU server with Triton's own CPU backends (NGC containers), not the bundled one
NATIVE_CPU_BACKENDS = {"python", "", "onnxruntime", "openvino"}
TARGETS = ("cpu", "cpu-native", "gpu")
# Python-backend stages of a CPU repository whose work a GPU repository gives to a GPU backend.
CPU_ONLY_TEMPLATES = {"onnx_encoder": "its ONNX graph (ONNX Runtime)", "dali_pipeline": "its DALI pipeline"}


@dataclass
class CheckReport:
    repository: Path
    models: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)  # what to do, once each, however many errors call for it

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, message: str, fix: str | None = None) -> None:
        self.errors.append(message)
        if fix and fix not in self.fixes:
            self.fixes.append(fix)

    @property
    def summary(self) -> str:
        """One line: how many models, the verdict, and what to do."""
        verdict = "ok" if self.ok else f"{len(self.errors)} error(s)"
        line = f"{self.repository}: {len(self.models)} models checked: {verdict}"
        return line + "".join(f"; {fix}" for fix in self.fixes)


def _kind(group) -> str:
    return model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)


def _signature(tensor) -> tuple[int, tuple[int, ...]]:
    return tensor.data_type, tuple(tensor.dims)


def check_repository(repository: Path, target: str | None = None) -> CheckReport:
    """`target` cpu (the bundled server), cpu-native (a CPU server with Triton's onnxruntime and
    openvino backends) or gpu also checks that instance kinds and backends suit it."""
    repository = Path(repository)
    report = CheckReport(repository)
    configs = {}
    for name in list_models(repository):
        try:
            configs[name] = read_config(repository / name)
        except ConfigError as exc:
            report.errors.append(str(exc))
            continue
        if configs[name].name and configs[name].name != name:
            report.errors.append(f"{name}: config names the model {configs[name].name!r}, the directory is {name!r}")
    report.models = sorted(configs)
    if not configs and not report.errors:
        report.errors.append(f"{repository}: no models (no */config.pbtxt)")
    for name, config in configs.items():
        stale = format_error(name, parameter(config, FORMAT_PARAMETER))
        if stale is not None:
            report.error(stale.message, fix=REBUILD_HINT)
        if config.platform == "ensemble":
            _check_ensemble(name, config, configs, report)
            continue
        _check_files(repository, name, config, report)
        _check_target(name, config, target, report)
    return report


def _check_files(repository: Path, name: str, config, report: CheckReport) -> None:
    """The files a model's backend loads are in its version directory."""
    backend = config.backend or config.platform
    required = REQUIRED_FILES.get(config.backend)
    if required is None and config.platform != "tensorrt_plan":
        report.warnings.append(f"{name}: backend {backend!r} is not one tritonkit writes; its files are not checked")
    elif required and not (repository / name / VERSION / required).exists():
        report.errors.append(f"{name}: the {config.backend} backend needs {VERSION}/{required}, which is missing")
    elif config.backend == "openvino" and not (repository / name / VERSION / "model.bin").exists():
        report.errors.append(f"{name}: {VERSION}/model.xml has no weights beside it ({VERSION}/model.bin)")


def _check_target(name: str, config, target: str | None, report: CheckReport) -> None:
    """A model's instance kinds and backend suit the server it is checked for."""
    kinds = {_kind(g) for g in config.instance_group}
    if target in ("cpu", "cpu-native") and "KIND_GPU" in kinds:
        report.error(
            f"{name}: KIND_GPU instances in a CPU repository",
            fix="the repository was built for a GPU: rebuild it with --target cpu for a CPU server",
        )
    if target == "cpu" and config.backend not in CPU_BACKENDS:
        report.error(
            f"{name}: the {config.backend} backend is not in the CPU server bundled here (Python backend only)",
            fix="check it with --target cpu-native for a server that has Triton's CPU backends",
        )
    if target == "cpu-native" and config.backend not in NATIVE_CPU_BACKENDS:
        report.errors.append(f"{name}: the {config.backend} backend is not a CPU backend")
    if config.backend == "openvino" and parameter(config, "HINT_BF16") is None:
        report.warnings.append(
            f"{name}: Triton's openvino backend has no FP32 precision hint, so on a CPU with native BF16 "
            "OpenVINO computes this graph's float parts in BF16 (its default there); for FP32 there, build with "
            "--engine onnxruntime --native-backends"
        )
    if target == "gpu" and config.backend in ("dali", "onnxruntime", "tensorrt") and "KIND_GPU" not in kinds:
        report.warnings.append(f"{name}: a {config.backend} model without KIND_GPU instances runs on CPU")
    template = parameter(config, TEMPLATE_PARAMETER)
    if target == "gpu" and template in CPU_ONLY_TEMPLATES and "KIND_GPU" not in kinds:
        report.error(
            f"{name}: runs {CPU_ONLY_TEMPLATES[template]} in the Python backend on CPU, which a GPU server "
            "does on its GPU backends",
            fix="the repository was built for CPU: rebuild it with --target gpu for a GPU server",
        )


def _check_ensemble(name: str, config, configs: dict, report: CheckReport) -> None:
    available = {t.name: _signature(t) for t in config.input}
    optional = {t.name for t in config.input if t.optional}
    for index, step in enumerate(config.ensemble_scheduling.step):
        where = f"{name} step {index + 1} ({step.model_name})"
        model = configs.get(step.model_name)
        if model is None:
            report.errors.append(f"{where}: no such model in the repository")
            continue
        _check_step_inputs(where, step, model, available, optional, report)
        outputs = {t.name: t for t in model.output}
        for model_output, tensor in step.output_map.items():
            if model_output not in outputs:
                report.errors.append(f"{where}: {step.model_name} has no output {model_output!r}")
            else:
                available[tensor] = _signature(outputs[model_output])
        if model.max_batch_size and config.max_batch_size > model.max_batch_size:
            report.errors.append(
                f"{where}: ensemble max_batch_size {config.max_batch_size} exceeds the model's {model.max_batch_size}"
            )
    for output in config.output:
        if output.name not in available:
            report.errors.append(f"{name}: output {output.name!r} is produced by no step")
        elif available[output.name] != _signature(output):
            report.errors.append(
                f"{name}: output {output.name} is {_describe(available[output.name])} where it is made "
                f"but declared {_describe(_signature(output))}"
            )


def _check_step_inputs(where: str, step, model, available: dict, optional: set[str], report: CheckReport) -> None:
    """An ensemble step's input map: every tensor exists by then, matches, and covers the model's
    required inputs."""
    inputs = {t.name: t for t in model.input}
    for model_input, tensor in step.input_map.items():
        if model_input not in inputs:
            report.errors.append(f"{where}: {step.model_name} has no input {model_input!r}")
        elif tensor not in available:
            report.errors.append(f"{where}: {tensor!r} is produced by no earlier step nor given as an ensemble input")
        elif available[tensor] != _signature(inputs[model_input]):
            report.errors.append(
                f"{where}: {tensor} is {_describe(available[tensor])} but "
                f"{step.model_name}.{model_input} expects {_describe(_signature(inputs[model_input]))}"
            )
        elif tensor in optional and not inputs[model_input].optional:
            report.errors.append(f"{where}: {tensor} is optional in the ensemble but required by {step.model_name}")
    for required in (t.name for t in model.input if not t.optional):
        if required not in step.input_map:
            report.errors.append(f"{where}: required input {required!r} is not mapped")


def _describe(signature: tuple[int, tuple[int, ...]]) -> str:
    dtype, dims = signature
    return f"{model_config_pb2.DataType.Name(dtype)}{list(dims)}"
