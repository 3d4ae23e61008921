"""ONNX export of a spec's modules, and validation of every export against PyTorch."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tritonkit.accuracy import cosines
from tritonkit.engines import ONNX_RUNTIME, Runtime
from tritonkit.errors import ExportError
from tritonkit.families.base import OnnxExport


@dataclass
class ValidationReport:
    role: str
    max_abs_error: float
    min_cosine: float
    batch_sizes: list[int]
    tolerance_max_abs: float
    tolerance_min_cosine: float

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.tolerance_max_abs and self.min_cosine >= self.tolerance_min_cosine

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.role}: max abs error {self.max_abs_error:.3g} (limit {self.tolerance_max_abs:g}), "
            f"min cosine {self.min_cosine:.6f} (limit {self.tolerance_min_cosine}) over batches {self.batch_sizes}: {verdict}"
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({**asdict(self), "passed": self.passed}, indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> ValidationReport:
        data = json.loads(Path(path).read_text())
        data.pop("passed", None)
        return cls(**data)


def export_onnx(export: OnnxExport, path: Path) -> Path:
    import onnx
    import torch

    input_names = [t.name for t in export.inputs]
    output_names = [t.name for t in export.outputs]
    dynamic_axes = {}
    for tensor in (*export.inputs, *export.outputs):
        axes = {0: export.first_axis.get(tensor.name, "batch")}
        axes.update({i + 1: f"{tensor.name}_dim{i + 1}" for i, d in enumerate(tensor.dims) if d == -1})
        dynamic_axes[tensor.name] = axes
    sample = export.sample_inputs[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow on constant shapes
            # The TorchScript exporter: deterministic, quick, and handles these towers without onnxscript.
            torch.onnx.export(
                export.module,
                tuple(sample[name] for name in input_names),
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=export.opset,
                do_constant_folding=True,
                dynamo=False,
            )
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"{export.role}: ONNX export failed: {exc}") from exc
    return path


def validate_onnx(export: OnnxExport, path: Path, runtime: Runtime = ONNX_RUNTIME) -> ValidationReport:
    """Run PyTorch and the graph (ONNX Runtime, or as `runtime` says: an OpenVINO IR) on every
    sample batch; shape mismatches are fatal."""
    import torch

    session = runtime.session(path)
    output_names = [t.name for t in export.outputs]
    max_abs, min_cos, batches = 0.0, 1.0, []
    for sample in export.sample_inputs:
        with torch.no_grad():
            expected = export.module(*[sample[t.name] for t in export.inputs])
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        feed = {t.name: sample[t.name].numpy() for t in export.inputs}
        actual = session.run(output_names, feed)
        for name, want, got in zip(output_names, expected, actual):
            want = want.numpy()
            if want.shape != got.shape:
                raise ExportError(
                    f"{export.role}: output {name} has shape {got.shape} on {runtime.engine}, {want.shape} in PyTorch"
                )
            max_abs = max(max_abs, float(np.abs(want - got).max()) if want.size else 0.0)
            min_cos = min(min_cos, float(cosines(want, got).min()))
        batches.append(int(next(iter(sample.values())).shape[0]))
    return ValidationReport(
        role=export.role,
        max_abs_error=max_abs,
        min_cosine=min_cos,
        batch_sizes=batches,
        tolerance_max_abs=export.tolerance.max_abs,
        tolerance_min_cosine=export.tolerance.min_cosine,
    )
