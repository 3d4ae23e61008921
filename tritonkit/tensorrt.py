"""TensorRT engines from the validated (and possibly QDQ or FP16) ONNX graphs. Needs an NVIDIA GPU.

Nothing in this module has run here: this project's machines have no GPU. It is written against
TensorRT 10's Python API and is exercised by tests marked `gpu`, which skip without a GPU.

- INT8 uses the explicit QDQ graph from `tritonkit.precision` in a strongly typed network (the
  implicit INT8 calibrators are deprecated since TensorRT 10.1); FP16 graphs are strongly typed
  too; an FP32 graph may be built with the FP16 flag (`allow_fp16`).
- One optimization profile: min/opt/max batch from the family's batching defaults.
- A timing cache is read and written, the builder log is kept, the engine is named with the GPU's
  compute capability and the TensorRT version, and `reproduce.sh` holds the equivalent trtexec
  command.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tritonkit.errors import TritonkitError
from tritonkit.triton_config import Tensor


class NoGpuError(TritonkitError):
    pass


def gpu_compute_capability() -> str | None:
    """'8.6' for the first GPU, or None when there is no usable NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def require_gpu() -> str:
    capability = gpu_compute_capability()
    if capability is None:
        raise NoGpuError(
            "TensorRT engines need an NVIDIA GPU, and none was found (nvidia-smi reports no GPU)",
            hint="build engines on the GPU machine that will serve them, or use --engine onnxruntime "
            "(ONNX graphs that any GPU machine can run)",
        )
    return capability


@dataclass(frozen=True)
class EngineProfile:
    """Batch sizes of the one optimization profile."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 16

    def shapes(self, tensor: Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if any(d == -1 for d in tensor.dims):
            raise TritonkitError(f"{tensor.name}: only the batch dimension may be dynamic in an engine profile")
        return (self.min_batch, *tensor.dims), (self.opt_batch, *tensor.dims), (self.max_batch, *tensor.dims)


@dataclass
class Engine:
    plan: Path
    log: Path
    reproduce: Path
    timing_cache: Path


def onnx_inputs(onnx_file: Path) -> list[Tensor]:
    """The graph's inputs as Tensors without their batch dimension."""
    import onnx

    names = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 9: "bool"}
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    tensors = []
    for value in graph.input:
        if value.name in constants:
            continue
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]
        tensors.append(Tensor(value.name, names.get(value.type.tensor_type.elem_type, "float32"), tuple(dims[1:])))
    return tensors


def _shape_arg(inputs: Sequence[Tensor], profile: EngineProfile, which: int) -> str:
    return ",".join(f"{t.name}:{'x'.join(map(str, profile.shapes(t)[which]))}" for t in inputs)


def trtexec_command(
    onnx_file: Path,
    plan: Path,
    inputs: Sequence[Tensor],
    profile: EngineProfile,
    strongly_typed: bool,
    fp16_flag: bool,
    timing_cache: Path,
) -> list[str]:
    command = [
        "trtexec",
        f"--onnx={onnx_file}",
        f"--saveEngine={plan}",
        f"--minShapes={_shape_arg(inputs, profile, 0)}",
        f"--optShapes={_shape_arg(inputs, profile, 1)}",
        f"--maxShapes={_shape_arg(inputs, profile, 2)}",
        f"--timingCacheFile={timing_cache}",
    ]
    if strongly_typed:
        command.append("--stronglyTyped")
    if fp16_flag:
        command.append("--fp16")
    return command


def build_engine(
    onnx_file: Path,
    out_dir: Path,
    inputs: Sequence[Tensor],
    profile: EngineProfile,
    *,
    precision: str = "fp32",
    allow_fp16: bool = False,
    workspace_bytes: int = 4 << 30,
) -> Engine:
    """Build a serialized engine for `onnx_file` (whose precision is `precision`)."""
    capability = require_gpu()
    try:
        import tensorrt as trt
    except ImportError:
        raise TritonkitError("TensorRT is not installed", hint="pip install 'tritonkit[gpu]'") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"model.{precision}.sm{capability.replace('.', '')}.trt{trt.__version__}.plan"
    plan, log, cache = out_dir / name, out_dir / "builder.log", out_dir / "timing.cache"
    strongly_typed = precision in ("int8", "fp16")
    fp16_flag = allow_fp16 and not strongly_typed

    class FileLogger(trt.ILogger):
        def __init__(self, path: Path):
            trt.ILogger.__init__(self)
            self.file = open(path, "w")  # noqa: SIM115 (closed when the build ends)

        def log(self, severity, message):
            self.file.write(f"[{severity.name}] {message}\n")

    logger = FileLogger(log)
    try:
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TritonkitError(f"{onnx_file}: TensorRT cannot parse it: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if fp16_flag:
            config.set_flag(trt.BuilderFlag.FP16)
        optimization = builder.create_optimization_profile()
        for tensor in inputs:
            optimization.set_shape(tensor.name, *profile.shapes(tensor))
        config.add_optimization_profile(optimization)
        timing = config.create_timing_cache(cache.read_bytes() if cache.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TritonkitError(f"{onnx_file}: TensorRT failed to build an engine", log_path=str(log))
        plan.write_bytes(bytes(serialized))
        cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    finally:
        logger.file.close()
    reproduce = out_dir / "reproduce.sh"
    command = trtexec_command(onnx_file, plan, inputs, profile, strongly_typed, fp16_flag, cache)
    reproduce.write_text("#!/bin/sh\n# The same engine with trtexec.\n" + shlex.join(command) + "\n")
    reproduce.chmod(0o755)
    return Engine(plan, log, reproduce, cache)
