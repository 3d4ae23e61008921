"""Capacity planning: memory per model instance, GPUs per replica, replicas for a target rate, cost.

Memory of one instance = its weights (the graph's initializers, so at the precision the build
chose; other files at their size) + the activation workspace + a per-instance overhead. The
workspace is the peak of the bytes of tensors alive at once when the graph's nodes run in order,
each tensor freed after its last consumer: what an allocator that reuses memory perfectly needs,
at the rows one run takes (the max batch size, or a CPU encoder's `rows_per_run`). Symbolic dims
are bound to that ("batch") or to the worst case the build recorded in the model's
`tritonkit_plan_dims` parameter (a size, or "batch" for a dim as large as the rows: a decoder's
windows when every row is a window of its own); any other dim counts as 1 and is reported.

A CPU model (a Python-backend stub holding everything in host memory) adds what was measured of
served repositories (`tritonkit plan REPO --measure`, scripts/soak.py): its template's runtime
(the interpreter and the libraries it imports), ONNX Runtime's arena at ARENA_FACTOR times the
ideal workspace, and its batch's input and output tensors. A GPU model's overhead is the stub and
CUDA context (`--overhead-mb`, 300 MB).

Replicas come from a `tritonkit bench` result measured on one replica of the target hardware.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tritonkit.errors import InputError
from tritonkit.families.base import (
    GRAPH_ROWS_PARAMETER,
    PLAN_DIMS_PARAMETER,
    PLAN_MEMORY_PARAMETER,
    ROWS_PER_RUN_PARAMETER,
    StageMemory,
)
from tritonkit.memory import SERVER
from tritonkit.repository import VERSION, read_repository
from tritonkit.triton_config import instance_count, parameter

MIB = 2**20
GPU_OVERHEAD_MB = 300.0  # a Python-backend stub and a CUDA context per GPU instance
# A Python-backend stage's fixed memory comes from its family (`FamilySpec.memory`, written into
# its config); a config without one (written by hand) is charged this.
DEFAULT_RUNTIME_MB = 60.0
# ONNX Runtime's CPU arena grows in powers of two and keeps its high-water mark: measured
# resident workspace over the ideal peak of `graph_memory`.
ARENA_FACTOR = 2.0
SERVER_RUNTIME_MB = 30.0  # tritonserver with the Python backend, before requests
# tritonserver maps the shared-memory pool through which it passes every stub's batch (PSS splits
# those pages between the two): its share of the CPU models' batch tensors.
SERVER_BUFFER_SHARE = 0.5

HOURS_PER_MONTH = 730
BATCH_DIM = "batch"
# Files in a version directory that are not loaded by the model.
NOT_LOADED = {"model.py", "export_report.json", "accuracy_report.json", "builder.log", "reproduce.sh"}


@dataclass(frozen=True)
class GraphMemory:
    file: str
    weight_bytes: int
    workspace_bytes: int  # the peak of inputs and intermediates alive at once (each freed after its last use)
    unsized_tensors: int  # intermediate tensors whose shape could not be inferred (not counted)
    assumed_dims: tuple[str, ...]  # symbolic dims nobody gave a size: counted as 1
    input_bytes: int = 0  # the graph's inputs (the caller holds them for the whole run)
    intermediate_bytes: int = 0  # the peak of the tensors the runtime allocates (intermediates and outputs)
    inputs: tuple[str, ...] = ()


def _dtype_size(elem_type: int) -> int:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def _initializer_bytes(tensor) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    return int(np.prod(tensor.dims, dtype=np.int64)) * _dtype_size(tensor.data_type)


def graph_memory(path: Path, dims: dict[str, int]) -> GraphMemory:
    """Weights and the peak activation bytes of an ONNX graph with `dims` bound (a dim given as a
    shell pattern, e.g. PAST_*_dim2, binds every dim it matches)."""
    import onnx

    model = onnx.load(str(path))
    weights = sum(_initializer_bytes(t) for t in model.graph.initializer)
    initializer_names = {t.name for t in model.graph.initializer}
    assumed = _bind_input_dims(model, dims, initializer_names)
    for value in model.graph.output:  # let inference fill the outputs from the bound inputs
        value.type.tensor_type.ClearField("shape")
    try:  # ONNX Runtime's symbolic inference resolves far more than onnx's (Reshape of computed shapes)
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    sizes = _tensor_bytes(inferred.graph)
    inputs = {v.name for v in inferred.graph.input if v.name not in initializer_names}
    peak, made_peak, unsized = _peak_live_bytes(inferred.graph, sizes, inputs)
    input_bytes = sum(sizes.get(name) or 0 for name in inputs)
    return GraphMemory(
        path.name, weights, peak, len(unsized), tuple(sorted(assumed)), input_bytes, made_peak, tuple(sorted(inputs))
    )


def _bind_input_dims(model, dims: dict[str, int], initializer_names: set[str]) -> set[str]:
    """Give the graph's symbolic input dims their sizes (1 where none is known); returns the dims
    that had none."""
    from fnmatch import fnmatchcase

    assumed = set()
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if not dim.dim_param:
                continue
            size = dims.get(dim.dim_param)
            if size is None:
                size = next((v for k, v in dims.items() if fnmatchcase(dim.dim_param, k)), None)
            if size is None:
                assumed.add(dim.dim_param)
                size = 1
            dim.ClearField("dim_param")
            dim.dim_value = size
    return assumed


def _tensor_bytes(graph) -> dict[str, int | None]:
    """Each inferred tensor's bytes (None where its shape is not fully known)."""
    sizes: dict[str, int | None] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        shape = value.type.tensor_type.shape
        known = value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in shape.dim)
        sizes[value.name] = (
            int(np.prod([d.dim_value for d in shape.dim], dtype=np.int64))
            * _dtype_size(value.type.tensor_type.elem_type)
            if known
            else None
        )
    return sizes


def _peak_live_bytes(graph, sizes: dict[str, int | None], inputs: set[str]) -> tuple[int, int, set[str]]:
    """Walk the nodes in order, each tensor freed after its last use: the peak bytes alive at once
    (inputs included), the peak of the runtime's own allocations, and the tensors of unknown size."""
    nodes = list(graph.node)
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = index
    outputs = {o.name for o in graph.output}
    live = set(inputs)
    unsized = {name for name in live if sizes.get(name) is None}
    live_bytes = sum(sizes.get(name) or 0 for name in inputs)
    peak = live_bytes
    made, made_peak = 0, 0  # the runtime's own allocations (inputs excluded)
    for index, node in enumerate(nodes):
        for name in node.output:
            if name and name not in live:
                live.add(name)
                live_bytes += sizes.get(name) or 0
                made += sizes.get(name) or 0
                if sizes.get(name) is None:
                    unsized.add(name)
        peak = max(peak, live_bytes)
        made_peak = max(made_peak, made)
        for name in node.input:
            if name in live and last_use.get(name) == index and name not in outputs:
                live.discard(name)
                live_bytes -= sizes.get(name) or 0
                if name not in inputs:
                    made -= sizes.get(name) or 0
    return peak, made_peak, unsized


@dataclass(frozen=True)
class ModelPlan:
    name: str
    instances: int
    max_batch_size: int
    weight_bytes: int
    workspace_bytes: int  # CPU: ONNX Runtime's arena (ARENA_FACTOR x the ideal peak); GPU: the ideal peak
    overhead_bytes: int  # CPU: the template's runtime; GPU: the stub and CUDA context
    graphs: tuple[GraphMemory, ...] = ()
    buffer_bytes: int = 0  # CPU: a full batch's input and output tensors held by the stub
    rows_per_run: int = 0  # the rows one graph run takes (the workspace's batch)
    target: str = "cpu"
    gpu_host_bytes: int = 0  # a GPU instance's host memory (its Python-backend stub's runtime)

    @property
    def bytes_per_instance(self) -> int:
        return self.weight_bytes + self.workspace_bytes + self.overhead_bytes + self.buffer_bytes

    @property
    def total_bytes(self) -> int:
        return self.instances * self.bytes_per_instance


@dataclass(frozen=True)
class Throughput:
    model: str
    requests_per_s: float  # one replica, the best level within the latency bound
    concurrency: int
    p99_ms: float

    @classmethod
    def from_bench(cls, path: Path, max_p99_ms: float | None = None) -> Throughput:
        try:
            result = json.loads(Path(path).read_text())
            levels = result["levels"]
            model = result["model"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"--bench {path}: not a `tritonkit bench --json` result ({exc})") from None
        usable = [lv for lv in levels if not lv.get("errors") and (max_p99_ms is None or lv["p99_ms"] <= max_p99_ms)]
        if not usable:
            bound = f" with p99 <= {max_p99_ms:g} ms" if max_p99_ms is not None else ""
            raise InputError(
                f"--bench {path}: no error-free level{bound}", hint="benchmark lower concurrency or relax --max-p99-ms"
            )
        best = max(usable, key=lambda lv: lv["throughput"])
        return cls(model, float(best["throughput"]), int(best["concurrency"]), float(best["p99_ms"]))


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelPlan, ...]
    replica_bytes: int
    gpu_memory_bytes: int
    gpus_per_replica: int
    instances_per_gpu: dict[str, int]
    qps: float | None = None
    throughput: Throughput | None = None
    utilization: float = 0.7
    replicas: int | None = None
    gpu_hour_price: float | None = None
    monthly_cost: float | None = None
    notes: tuple[str, ...] = field(default=())
    server_bytes: int = 0  # host memory of tritonserver itself (CPU repositories: in replica_bytes)

    @property
    def host_bytes(self) -> int:
        """Host memory of one replica: tritonserver, every CPU model's instances and the GPU
        instances' stubs."""
        return self.server_bytes + sum(
            m.total_bytes if m.target == "cpu" else m.instances * m.gpu_host_bytes for m in self.models
        )

    def to_json(self) -> dict:
        data = asdict(self)
        data["host_bytes"] = self.host_bytes
        for model, entry in zip(self.models, data["models"]):
            entry["bytes_per_instance"] = model.bytes_per_instance
            entry["total_bytes"] = model.total_bytes
        return data


def batch_tensor_bytes(config, rows: int) -> int:
    """Bytes of `rows` rows of a model's fixed-shape inputs and outputs (variable dims count 0)."""
    from tritonkit.dtypes import numpy_dtype
    from tritonkit.triton_config import model_config_pb2

    total = 0
    for tensor in [*config.input, *config.output]:
        dims = list(tensor.dims)
        if any(d < 0 for d in dims):
            continue
        dtype = numpy_dtype(model_config_pb2.DataType.Name(tensor.data_type))
        if dtype is np.object_:  # strings: their size is the request's
            continue
        total += rows * int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def model_plans(
    repository: Path,
    overhead_bytes: int | None = None,
    dims: dict[str, int] | None = None,
    concurrency: int | None = None,
    batches: Mapping[str, float] | None = None,
    configs: Mapping[str, Any] | None = None,
) -> list[ModelPlan]:
    """Memory of every non-ensemble model of a repository. `overhead_bytes` replaces the
    per-instance overhead (CPU: the stage's measured fixed memory or its template's; GPU:
    GPU_OVERHEAD_MB). With `concurrency` (requests in flight), batches hold at most that many
    requests' rows; without it, the max batch size (the worst case a memory limit must hold).
    `batches` (model -> average rows per execution, as measured) sets the rows of those models;
    `configs` are the repository's, when the caller has read them already."""
    plans = []
    for name, config in (configs if configs is not None else read_repository(repository)).items():
        if config.platform == "ensemble":
            continue
        version_dir = Path(repository) / name / VERSION
        gpu = any(group.kind == group.KIND_GPU for group in config.instance_group)
        recorded_memory = parameter(config, PLAN_MEMORY_PARAMETER)
        stage_memory = StageMemory.from_json(recorded_memory) if recorded_memory else StageMemory()
        batch_rows = max(config.max_batch_size, 1)
        if concurrency is not None:
            batch_rows = min(batch_rows, concurrency)
        if batches and name in batches:
            batch_rows = min(batch_rows, max(1, math.ceil(batches[name])))
        rows = batch_rows
        rows_per_run = int(parameter(config, ROWS_PER_RUN_PARAMETER) or 0)
        if rows_per_run and not gpu:
            rows = min(rows, rows_per_run)
        bound = {BATCH_DIM: rows}
        recorded = config.parameters.get(PLAN_DIMS_PARAMETER)
        if recorded is not None:
            bound.update(json.loads(recorded.string_value))
        bound.update(dims or {})
        rows_alike = [dim for dim, size in bound.items() if size == BATCH_DIM]
        config_tensors = {t.name for t in [*config.input, *config.output]}
        graph_rows = json.loads(parameter(config, GRAPH_ROWS_PARAMETER) or "{}")  # graphs run in slices
        graphs, weights, workspace, arena = [], 0, 0, 0
        for path in sorted(version_dir.rglob("*")) if version_dir.is_dir() else []:
            if (
                not path.is_file()
                or path.name in NOT_LOADED
                or path.name.endswith(".export_report.json")
                or "__pycache__" in path.parts
            ):
                continue
            if path.suffix == ".onnx":
                sliced = graph_rows.get(path.name)
                graph_rows_bound = min(rows, sliced) if sliced else rows
                memory = graph_memory(path, {**bound, **dict.fromkeys([BATCH_DIM, *rows_alike], graph_rows_bound)})
                graphs.append(memory)
                weights += memory.weight_bytes
                workspace = max(workspace, memory.workspace_bytes)  # graphs of one model run one after another
                # a CPU stub: the arena holds what ONNX Runtime allocates, the stub the inputs it makes
                # itself (a decoder's caches; inputs that are the model's own tensors are its buffers)
                held = 0 if set(memory.inputs) <= config_tensors else memory.input_bytes
                arena = max(arena, held + int(ARENA_FACTOR * memory.intermediate_bytes))
            else:
                weights += path.stat().st_size
        instances = instance_count(config)
        template = parameter(config, "tritonkit_template") or ""
        runtime = stage_memory.fixed_mb if stage_memory.fixed_mb is not None else DEFAULT_RUNTIME_MB
        fields: dict[str, Any]
        if gpu:
            # a Python-backend stub on a GPU still holds its runtime in host memory; the ONNX
            # Runtime and TensorRT backends run inside tritonserver
            fields = {
                "workspace_bytes": workspace,
                "overhead_bytes": overhead_bytes if overhead_bytes is not None else int(GPU_OVERHEAD_MB * MIB),
                "target": "gpu",
                "gpu_host_bytes": int(runtime * MIB) if template else 0,
            }
        else:
            fields = {
                "workspace_bytes": arena,
                "overhead_bytes": overhead_bytes if overhead_bytes is not None else int(runtime * MIB),
                "buffer_bytes": batch_tensor_bytes(config, batch_rows),
                "rows_per_run": rows,
            }
        plans.append(
            ModelPlan(
                name=name,
                instances=instances,
                max_batch_size=config.max_batch_size,
                weight_bytes=weights,
                graphs=tuple(graphs),
                **fields,
            )
        )
    if not plans:
        raise InputError(f"{repository}: no models to plan for", hint="build one with `tritonkit build`")
    return plans


def make_plan(
    repository: Path,
    qps: float | None = None,
    bench: Path | None = None,
    gpu_memory_gb: float = 24.0,
    gpu_hour_price: float | None = None,
    utilization: float = 0.7,
    max_p99_ms: float | None = None,
    overhead_mb: float | None = None,
    dims: dict[str, int] | None = None,
    concurrency: int | None = None,
    batches: Mapping[str, float] | None = None,
) -> Plan:
    if qps is not None and qps <= 0:
        raise InputError(f"--qps must be > 0, got {qps:g}")
    if not 0 < utilization <= 1:
        raise InputError(f"--utilization must be in (0, 1], got {utilization:g}")
    if gpu_memory_gb <= 0:
        raise InputError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb:g}")
    if qps is not None and bench is None:
        raise InputError(
            "--qps needs --bench RESULT.json",
            hint="measure one replica with `tritonkit bench MODEL ... --json RESULT.json`",
        )
    if concurrency is not None and concurrency < 1:
        raise InputError(f"--concurrency must be >= 1, got {concurrency}")
    overhead = None if overhead_mb is None else int(overhead_mb * MIB)
    configs = read_repository(repository)
    models = tuple(model_plans(repository, overhead, dims, concurrency, batches, configs))
    gpu_bytes = int(gpu_memory_gb * 2**30)
    replica_bytes = sum(m.total_bytes for m in models)
    notes = []
    for model in models:
        for graph in model.graphs:
            if graph.assumed_dims:
                notes.append(
                    f"{model.name}/{graph.file}: dims {', '.join(graph.assumed_dims)} counted as 1 (pass --dim NAME=SIZE)"
                )
            if graph.unsized_tensors:
                notes.append(f"{model.name}/{graph.file}: {graph.unsized_tensors} tensors of unknown shape not counted")
    cpu_models = [m for m in models if m.target == "cpu"]
    server = int(SERVER_RUNTIME_MB * MIB) + int(SERVER_BUFFER_SHARE * sum(m.buffer_bytes for m in cpu_models))
    for config in configs.values():  # what each family's requests add (measured)
        recorded = parameter(config, PLAN_MEMORY_PARAMETER) if config.platform == "ensemble" else None
        if recorded:
            server += int((StageMemory.from_json(recorded).fixed_mb or 0.0) * MIB)
    plan = Plan(
        models=models,
        server_bytes=server,
        replica_bytes=replica_bytes,
        gpu_memory_bytes=gpu_bytes,
        gpus_per_replica=max(1, math.ceil(replica_bytes / gpu_bytes)),
        instances_per_gpu={m.name: gpu_bytes // m.bytes_per_instance for m in models if m.bytes_per_instance},
        utilization=utilization,
        gpu_hour_price=gpu_hour_price,
        notes=tuple(notes),
    )
    if bench is not None:
        throughput = Throughput.from_bench(bench, max_p99_ms)
        replicas = None
        if qps is not None:
            replicas = max(1, math.ceil(qps / (throughput.requests_per_s * utilization)))
        cost = (
            replicas * plan.gpus_per_replica * gpu_hour_price * HOURS_PER_MONTH if replicas and gpu_hour_price else None
        )
        plan = replace(plan, qps=qps, throughput=throughput, replicas=replicas, monthly_cost=cost)
    return plan


@dataclass(frozen=True)
class MemoryCheck:
    """Predicted against measured resident memory of one model (all its instances) or tritonserver."""

    model: str
    predicted_bytes: int
    measured_bytes: int

    @property
    def error(self) -> float:
        """(predicted - measured) / measured: +0.2 predicts 20% more than the model holds."""
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes if self.measured_bytes else 0.0


@dataclass(frozen=True)
class Measurement:
    sizes: dict[str, int]  # resident bytes per model (all its instances) and of tritonserver
    batches: dict[str, float] = field(default_factory=dict)  # average rows per execution, per model


def measured_memory(source: str) -> Measurement:
    """Resident bytes per model from a served repository: Triton's metrics URL (host:8002 or
    http://host:8002/metrics), a saved /metrics page, or a `scripts/soak.py --json` report (the
    median of its last third, per model, and the batches the soak's models ran)."""
    from tritonkit.memory import average_batches, resident_from_metrics

    if source.startswith(("http://", "https://")) or (":" in source and not Path(source).exists()):
        import urllib.request

        url = source if source.startswith("http") else f"http://{source}"
        if not url.rstrip("/").endswith("/metrics"):
            url = url.rstrip("/") + "/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        except OSError as exc:
            raise InputError(
                f"--measure {source}: cannot read {url} ({exc})", hint="pass the server's metrics port"
            ) from None
        where = f"at {url}"
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InputError(f"--measure {source}: {exc.strerror or exc}") from None
        if path.suffix == ".json":
            return soak_measurement(source, text)
        where = "in this metrics page"
    found = resident_from_metrics(text)
    if not found:
        raise InputError(
            f"--measure {source}: no tritonkit_resident_bytes {where}",
            hint="serve a repository built by this tritonkit, and send it a request first",
        )
    return Measurement(found, average_batches(text))


def soak_measurement(source: str, text: str) -> Measurement:
    """A `scripts/soak.py --json` report's settled memory per model and average batches."""
    try:
        report = json.loads(text)
        sizes = {name: int(mb * MIB) for name, mb in report["rss_mb_settled"].items() if name != "gateway"}
        return Measurement(sizes, dict(report.get("average_batch") or {}))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"--measure {source}: not a scripts/soak.py --json report (no rss_mb_settled)") from None


def check_memory(plan: Plan, measured: Mapping[str, int]) -> list[MemoryCheck]:
    """Each planned model (and tritonserver) beside what was measured of it."""
    checks = [
        MemoryCheck(model.name, model.total_bytes, measured[model.name])
        for model in plan.models
        if model.name in measured and model.target == "cpu"
    ]
    if SERVER in measured:
        checks.append(MemoryCheck(SERVER, plan.server_bytes, measured[SERVER]))
    return checks


MEMORY_MARGIN = 0.25  # headroom of a memory limit over the replica's measured or predicted memory
LIMIT_STEP = 256 * MIB


def replica_memory_limit(repository: Path, measured: str | None = None) -> tuple[int, str]:
    """A replica's memory request and limit, rounded up to 256 MiB, and what it rests on: the
    measured resident memory of a served copy (`measured`, as `--measure` takes it) or the plan's
    prediction (itself fitted to measurements), plus MEMORY_MARGIN."""
    if measured is not None:
        total = sum(measured_memory(measured).sizes.values())
        basis = f"measured ({measured})"
    else:
        total = make_plan(repository).host_bytes
        basis = "predicted by tritonkit plan"
    limit = math.ceil(total * (1 + MEMORY_MARGIN) / LIMIT_STEP) * LIMIT_STEP
    return limit, f"{basis}: {total / MIB:,.0f} MiB + {MEMORY_MARGIN:.0%}"


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"
