"""How a CPU stage runs its graphs: ONNX Runtime or OpenVINO, behind one session interface.

The Python-backend templates and the decoding loops (`tritonkit.whisper_decoding`) call
`get_inputs()`, `get_outputs()` and `run(names, feed)` as ONNX Runtime's InferenceSession has them;
`OpenVinoSession` gives an OpenVINO compiled model the same three, so every stage runs on either.

OpenVINO's CPU plugin computes in BF16 by default on CPUs with native BF16 (AVX-512 BF16, AMX):
a session always states its precision hint, so "fp32" is FP32 on every CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonkit.errors import InputError

CPU_ENGINES = ("onnxruntime", "openvino")
# OpenVINO's INFERENCE_PRECISION_HINT per tritonkit precision (INT8 graphs compute their float
# parts in FP32: they are judged that way)
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
IR_SUFFIX = ".xml"  # an OpenVINO IR graph: FILE.xml with its weights in FILE.bin


@dataclass(frozen=True)
class GraphTensor:
    """One input or output of a graph, as ONNX Runtime's NodeArg reports it: dims are ints, or
    strings for dims that vary."""

    name: str
    shape: tuple[int | str, ...]


class OpenVinoSession:
    """An OpenVINO CPU compiled model with ONNX Runtime's session interface."""

    def __init__(self, path: Path, precision: str = "fp32", threads: int = 0):
        import openvino as ov

        if precision not in OPENVINO_HINTS:
            raise ValueError(f"OpenVINO precision {precision!r}: use one of {', '.join(OPENVINO_HINTS)}")
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OPENVINO_HINTS[precision],
            # one stream: Triton's instances are the parallelism, each a single request at a time
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self.precision = precision
        core = ov.Core()
        model = core.read_model(str(path))
        # names from the graph as read: compiling merges the names of tensors it folds away into
        # the ports', and get_any_name() may then give an inner one
        self._inputs = [_graph_tensor(port) for port in model.inputs]
        self._outputs = [_graph_tensor(port) for port in model.outputs]
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def get_inputs(self) -> list[GraphTensor]:
        return list(self._inputs)

    def get_outputs(self) -> list[GraphTensor]:
        return list(self._outputs)

    def property(self, name: str) -> Any:
        return self.compiled.get_property(name)

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # `infer` copies the outputs out of the request's buffers (share_outputs=False), so a
        # result stays valid after the next call
        result = self.request.infer(dict(feed))
        names = output_names or [tensor.name for tensor in self._outputs]
        return [result[name] for name in names]


def _graph_tensor(port) -> GraphTensor:
    dims = tuple(
        d.get_length() if d.is_static else f"{port.get_any_name()}_dim{i}"
        for i, d in enumerate(port.get_partial_shape())
    )
    return GraphTensor(port.get_any_name(), dims)


def open_session(
    path: Path,
    engine: str = "onnxruntime",
    *,
    precision: str = "fp32",
    threads: int = 0,
    providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",),
):
    """A session over the graph `path` (ONNX, or OpenVINO IR for openvino) on `engine`;
    `providers` are ONNX Runtime's."""
    if engine == "openvino":
        return OpenVinoSession(Path(path), precision, threads)
    if engine != "onnxruntime":
        raise ValueError(f"engine {engine!r}: use one of {', '.join(CPU_ENGINES)}")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=list(providers))


@dataclass(frozen=True)
class Runtime:
    """How a graph is run: its engine and, on OpenVINO, the precision it computes in."""

    engine: str = "onnxruntime"
    precision: str = "fp32"

    def session(self, path: Path, threads: int = 0):
        return open_session(path, self.engine, precision=self.precision, threads=threads)


ONNX_RUNTIME = Runtime()  # the default: ONNX Runtime on the CPU


def onnxruntime_providers(parameters: Mapping[str, str], model_name: str) -> list[str | tuple[str, dict]]:
    """A template's ONNX Runtime execution providers (parameter `providers`, comma-separated; the
    TensorRT provider with the options of parameter `tensorrt_options`, its engines cached under the
    temporary directory); a GPU repository's on an ONNX Runtime without them fails at load with what
    to do."""
    providers = parameters.get("providers", "CPUExecutionProvider").split(",")
    if parameters.get("engine", "onnxruntime") == "onnxruntime":
        import onnxruntime as ort

        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(
                f"{model_name}: ONNX Runtime here lacks {', '.join(missing)}; this repository was built with "
                "--target gpu: run it on a GPU machine with onnxruntime-gpu (and TensorRT for "
                "--engine onnxruntime-trt), or rebuild with --target cpu"
            )
    tensorrt = json.loads(parameters.get("tensorrt_options", "{}"))
    if not tensorrt:
        return list(providers)
    tensorrt.setdefault("trt_engine_cache_path", str(Path(tempfile.gettempdir()) / "tritonkit-tensorrt" / model_name))
    return [(p, tensorrt) if p == "TensorrtExecutionProvider" else p for p in providers]


def session_from_parameters(path: Path, parameters: Mapping[str, str], model_config: Mapping[str, Any], **kwargs):
    """A template's session, as its config's parameters say (`engine`, `inference_precision`,
    `intra_op_threads`), on `instance_threads` threads."""
    return open_session(
        path,
        parameters.get("engine", "onnxruntime"),
        precision=parameters.get("inference_precision", "fp32"),
        threads=instance_threads(parameters, model_config),
        **kwargs,
    )


def instance_threads(parameters: Mapping[str, str], model_config: Mapping[str, Any]) -> int:
    """The threads one instance of a Python-backend model computes with: its `intra_op_threads`
    parameter, or the cores it may use divided by its instance count. Left to themselves torch,
    ONNX Runtime and OpenVINO each take every core, and a model's instances (and the models beside
    them) then fight over the same cores."""
    threads = int(parameters.get("intra_op_threads", "0") or 0)
    if threads > 0:
        return threads
    groups = model_config.get("instance_group", [])
    return threads_per_instance(sum(int(group.get("count", 1)) for group in groups) or 1)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_instance(instances: int) -> int:
    """The cores each of a model's `instances` may use, so that they do not oversubscribe them."""
    return max(1, usable_cores() // instances)


def cpu_capabilities() -> set[str]:
    """What OpenVINO's CPU plugin computes natively here (FP32, INT8, BF16, FP16, ...)."""
    import openvino as ov

    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def require_native_bf16() -> None:
    """BF16 is a precision only where the CPU computes it natively (elsewhere OpenVINO silently
    computes FP32): fail before any slow work."""
    capabilities = cpu_capabilities()
    if "BF16" not in capabilities:
        raise InputError(
            f"--precision bf16: this CPU has no native BF16 (OpenVINO reports {', '.join(sorted(capabilities))})",
            hint="build it on a CPU with AVX-512 BF16 or AMX (and serve it on one), or use --precision int8 or fp32",
        )


def graph_name(path: Path, stem: str) -> str:
    """The name of graph `path` in a version directory: `stem`.onnx, or `stem`.xml for an IR."""
    return stem + (IR_SUFFIX if Path(path).suffix == IR_SUFFIX else ".onnx")


def graph_files(path: Path, stem: str) -> dict[str, Path]:
    """The files graph `path` is made of, by their names in a version directory: `stem`.onnx, or
    an IR's `stem`.xml and `stem`.bin (OpenVINO reads the weights beside the .xml)."""
    path = Path(path)
    if path.suffix == IR_SUFFIX:
        return {f"{stem}.xml": path, f"{stem}.bin": path.with_suffix(".bin")}
    return {f"{stem}.onnx": path}
