"""Triton model configs built from the real protobuf schema, written and parsed as text format.

Configs are assembled as plain dicts, turned into `model_config_pb2.ModelConfig` with
`json_format.ParseDict` (which rejects unknown fields), and written with `text_format`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tritonkit.dtypes import TRITON_DTYPES
from tritonkit.errors import ConfigError
from tritonkit.repository_format import FORMAT, FORMAT_PARAMETER


@dataclass(frozen=True)
class Tensor:
    """A tensor of a Triton model, without its batch dimension."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    ragged: bool = False  # lets the dynamic batcher merge requests whose shapes differ
    optional: bool = False  # an input requests may leave out

    def __post_init__(self):
        if self.dtype not in TRITON_DTYPES:
            raise ConfigError(f"tensor {self.name}: unknown dtype {self.dtype!r}; use one of {sorted(TRITON_DTYPES)}")
        if not self.name or not all(isinstance(d, int) and d >= -1 and d != 0 for d in self.dims):
            raise ConfigError(f"tensor {self.name!r}: dims must be positive or -1, got {self.dims}")
        object.__setattr__(self, "dims", tuple(self.dims))

    @property
    def triton_type(self) -> str:
        return TRITON_DTYPES[self.dtype]

    def as_dict(self, *, is_input: bool) -> dict:
        entry: dict[str, Any] = {"name": self.name, "data_type": self.triton_type, "dims": list(self.dims)}
        if is_input and self.ragged:
            entry["allow_ragged_batch"] = True
        if is_input and self.optional:
            entry["optional"] = True
        return entry


@dataclass(frozen=True)
class Batching:
    """Dynamic batching and instance settings of one Triton model."""

    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    max_queue_delay_us: int = 2000
    instances: int = 1
    # CPU encoders: rows ONNX Runtime runs at once (0: the whole batch). Graphs whose activations
    # grow large per row (Whisper's 1500-frame attention) run as fast or faster in small slices and
    # keep the arena at the slice's size instead of the largest batch's (scripts/measure_rows.py).
    rows_per_run: int = 0

    def __post_init__(self):
        if self.rows_per_run < 0:
            raise ConfigError(f"rows_per_run must be >= 0, got {self.rows_per_run}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.instances < 1:
            raise ConfigError(f"instances must be >= 1, got {self.instances}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        preferred = tuple(sorted({int(b) for b in self.preferred_batch_sizes if b <= self.max_batch_size}))
        if any(b < 1 for b in preferred):
            raise ConfigError(f"preferred batch sizes must be >= 1, got {self.preferred_batch_sizes}")
        object.__setattr__(self, "preferred_batch_sizes", preferred)

    def override(self, **values) -> Batching:
        """A copy with the given fields replaced; None means keep."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class EnsembleStep:
    model_name: str
    input_map: Mapping[str, str]  # composing model's input -> ensemble tensor
    output_map: Mapping[str, str]  # composing model's output -> ensemble tensor


@dataclass
class ModelFiles:
    """A model's config plus what goes into its version directory."""

    config: model_config_pb2.ModelConfig
    files: dict[str, Path | bytes] = field(default_factory=dict)  # name in `1/` -> source

    @property
    def name(self) -> str:
        return self.config.name


def _parse(config: dict) -> model_config_pb2.ModelConfig:
    try:
        return json_format.ParseDict(config, model_config_pb2.ModelConfig())
    except json_format.ParseError as exc:  # a bug in a spec, but say which model
        raise ConfigError(f"model {config.get('name')!r}: invalid config: {exc}") from exc


BACKENDS = ("python", "dali", "onnxruntime", "tensorrt", "openvino")
KINDS = ("KIND_CPU", "KIND_GPU")


def model_config(
    name: str,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    batching: Batching,
    parameters: Mapping[str, str] | None = None,
    *,
    backend: str = "python",
    kind: str = "KIND_CPU",
    extra: Mapping | None = None,
) -> model_config_pb2.ModelConfig:
    """A composing model: `backend` runs it (Python backend, DALI backend, ONNX Runtime backend)."""
    if backend not in BACKENDS:
        raise ConfigError(f"model {name!r}: unknown backend {backend!r}; use one of {BACKENDS}")
    if kind not in KINDS:
        raise ConfigError(f"model {name!r}: unknown instance kind {kind!r}; use one of {KINDS}")
    config = {
        "name": name,
        "backend": backend,
        "max_batch_size": batching.max_batch_size,
        "input": [t.as_dict(is_input=True) for t in inputs],
        "output": [t.as_dict(is_input=False) for t in outputs],
        "dynamic_batching": {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": str(batching.max_queue_delay_us),
        },
        "instance_group": [{"count": batching.instances, "kind": kind}],
        "parameters": {k: {"string_value": str(v)} for k, v in stamped(parameters).items()},
        **(extra or {}),  # other ModelConfig fields (optimization, model_warmup), checked by the schema
    }
    return _parse(config)


def warmup(inputs: Sequence[Tensor], batch_size: int = 1) -> dict:
    """A `model_warmup` entry of zeros: the first real request does not pay for engine setup."""
    return {
        "model_warmup": [
            {
                "name": "zeros",
                "batch_size": batch_size,
                "inputs": {
                    t.name: {"data_type": t.triton_type, "dims": [max(d, 1) for d in t.dims], "zero_data": True}
                    for t in inputs
                },
            }
        ]
    }


def ensemble_config(
    name: str,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    max_batch_size: int,
    steps: Sequence[EnsembleStep],
    response_cache: bool = False,
    parameters: Mapping[str, str] | None = None,
) -> model_config_pb2.ModelConfig:
    config: dict[str, Any] = {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": max_batch_size,
        "input": [t.as_dict(is_input=True) for t in inputs],
        "output": [t.as_dict(is_input=False) for t in outputs],
        "ensemble_scheduling": {
            "step": [
                {
                    "model_name": s.model_name,
                    "model_version": "-1",
                    "input_map": dict(s.input_map),
                    "output_map": dict(s.output_map),
                }
                for s in steps
            ]
        },
    }
    if response_cache:  # served from Triton's response cache when the server has one
        config["response_cache"] = {"enable": True}
    config["parameters"] = {k: {"string_value": v} for k, v in stamped(parameters).items()}
    return _parse(config)


def stamped(parameters: Mapping[str, str] | None) -> dict[str, str]:
    """A model's parameters with the repository format it is written in (`tritonkit.repository_format`)."""
    return {FORMAT_PARAMETER: str(FORMAT), **(parameters or {})}


def to_text(config: model_config_pb2.ModelConfig) -> str:
    text = text_format.MessageToString(config)
    # protobuf omits default values; Triton reads a missing max_batch_size as 0 (no batching),
    # which is what we mean then, so nothing needs adding.
    return text


def parse_text(text: str, source: str = "<string>") -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: not a valid Triton model config: {exc}") from exc


def write_config(config: model_config_pb2.ModelConfig, model_dir: Path) -> Path:
    path = Path(model_dir) / "config.pbtxt"
    path.write_text(to_text(config))
    return path


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    path = Path(model_dir) / "config.pbtxt"
    if not path.is_file():
        raise ConfigError(f"{path}: missing config.pbtxt")
    return parse_text(path.read_text(), str(path))


def instance_count(config: model_config_pb2.ModelConfig) -> int:
    """Instances Triton runs of a model (an instance group without a count runs one)."""
    return sum(max(group.count, 1) for group in config.instance_group) or 1


def parameter(config: model_config_pb2.ModelConfig, key: str, default: str | None = None) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value
    return default
