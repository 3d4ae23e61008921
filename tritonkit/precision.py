"""Reduced precision for exported ONNX graphs: INT8 (static QDQ or dynamic) and FP16, each
checked against the FP32 PyTorch model before a build may use it.

- INT8 static: ONNX Runtime's calibrated quantization to a QDQ graph, symmetric INT8 activations
  and per-channel weights (the form TensorRT consumes for explicit INT8; its implicit calibrators
  are deprecated since 10.1).
- INT8 dynamic: weights INT8, activations quantized at run time; CPU only, no calibration.
- Which nodes: the linear layers only (MatMul/Gemm with a constant weight), except those fed by
  an activation function (an MLP's down projection, whose input has outliers). Attention's
  activation-by-activation MatMuls, convolutions, LayerNorm, Softmax and residual Adds stay in
  float. Measured on Whisper tiny.en's encoder: quantizing every MatMul and Conv gives a cosine of
  0.62 to FP32 on speech; this recipe gives 0.99 (`scripts/bench_precision.py` reports it).
- FP16: float16 weights and compute, with LayerNorm, Softmax, reductions and the graph's inputs
  and outputs kept in float32.
- OpenVINO (`--engine openvino`): every graph becomes OpenVINO IR with FP32 weights. BF16 is the
  FP32 graph run with OpenVINO's BF16 precision hint (only where the CPU has native BF16); INT8 is
  NNCF's post-training quantization for transformers with SmoothQuant (NNCF's recipe), the same
  without SmoothQuant, and INT8 weights with float activations (`nncf.compress_weights`), the
  first in that order that passes kept. A family may keep a graph weights-only in every INT8
  variant (`FamilySpec.int8_weights_only`: Whisper's decoder step, which full INT8 ruins).

`auto` (the INT8 default) builds both INT8 variants and keeps the faster one that passes its
accuracy report, measured on this machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from tritonkit.accuracy import cosines
from tritonkit.engines import IR_SUFFIX, ONNX_RUNTIME, Runtime
from tritonkit.errors import ExportError, InputError

if TYPE_CHECKING:
    from tritonkit.families.base import OnnxExport

T = TypeVar("T")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
QUANTIZATIONS = ("auto", "static", "dynamic", "nncf")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ["MatMul", "Gemm"]
ACTIVATION_FUNCTIONS = {"Erf", "Gelu", "FastGelu", "Sigmoid", "Tanh", "Relu", "QuickGelu"}
FP16_KEEP_FLOAT32 = [
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "Pow",
    "Sqrt",
    "Erf",
    "Exp",
    "Log",
]

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class PrecisionOptions:
    precision: str = "fp32"
    quantization: str = "auto"  # INT8 only
    calibration_method: str = "minmax"  # INT8 static only
    calibration_data: Path | None = None  # the user's own images/audio/texts; else a documented default
    force: bool = False  # keep a variant whose accuracy report failed
    min_cosine: float | None = None  # override the family's bound
    max_wer_increase: float | None = None  # override the family's bound (speech)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.quantization not in QUANTIZATIONS:
            raise InputError(f"--quantization {self.quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise InputError(
                f"--calibration-method {self.calibration_method!r}: use one of {', '.join(CALIBRATION_METHODS)}"
            )
        if self.calibration_data is not None and not Path(self.calibration_data).is_dir():
            raise InputError(f"--calibration-data {self.calibration_data}: no such directory")

    def variants(self, engine: str = "onnxruntime") -> list[str]:
        """The graph variants to build and compare for `engine`: fp16, int8-static, int8-dynamic
        (ONNX Runtime, TensorRT); bf16, int8-nncf, int8-nncf-nosq, int8-nncf-weights (OpenVINO)."""
        openvino = engine == "openvino"
        if self.precision == "bf16" and not openvino:
            raise InputError("--precision bf16 runs on OpenVINO: add --engine openvino")
        if self.precision == "fp16" and openvino:
            raise InputError("--precision fp16 is not a CPU precision on OpenVINO: use bf16 or int8")
        if self.precision == "int8" and self.quantization != "auto" and openvino != (self.quantization == "nncf"):
            raise InputError(
                f"--quantization {self.quantization} is for "
                + ("--engine openvino" if self.quantization == "nncf" else "ONNX Runtime and TensorRT builds")
                + (": use nncf (or auto) with --engine openvino" if openvino else "")
            )
        if self.precision in ("fp16", "bf16"):
            return [self.precision]
        if self.precision == "int8":
            if openvino:
                return ["int8-nncf", "int8-nncf-nosq", "int8-nncf-weights"]
            return {"auto": ["int8-static", "int8-dynamic"], "static": ["int8-static"], "dynamic": ["int8-dynamic"]}[
                self.quantization
            ]
        return []


@dataclass
class PrecisionData:
    """What a family hands the precision step: encoder inputs to calibrate on, held-out inputs
    to judge by (never the same), and anything its task-level check needs."""

    calibration: dict[str, list[Feeds]]  # export role -> feeds
    heldout: dict[str, list[Feeds]]
    source: str  # where the data came from, for the report
    task: dict = field(default_factory=dict)
    builtin: bool = False  # tritonkit.calibration's set, not the user's: the report says so


@dataclass
class AccuracyReport:
    variant: str
    data_source: str  # which data it measured (says when it is the built-in set)
    graphs: dict[str, dict[str, float]]  # role -> min_cosine, mean_cosine, max_abs_error vs FP32 PyTorch
    task: dict[str, float]  # family metrics (Whisper: WER, token agreement)
    thresholds: dict[str, float]
    failures: list[str]
    latency_ms: dict[str, float]  # role -> median ms of one held-out batch here

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        parts = [
            f"{role} cosine min {g['min_cosine']:.4f} mean {g['mean_cosine']:.4f}, max abs {g['max_abs_error']:.3g}"
            for role, g in self.graphs.items()
        ]
        parts += [f"{k} {v:.4g}" for k, v in self.task.items()]
        verdict = "ok" if self.passed else "FAILED: " + "; ".join(self.failures)
        return f"{self.variant}: " + ", ".join(parts) + f": {verdict}"

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps({**asdict(self), "passed": self.passed}, indent=2) + "\n")


class FeedReader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[Feeds]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def convert(
    fp32: Path,
    out: Path,
    variant: str,
    calibration: list[Feeds],
    method: str = "minmax",
    weights_only: bool = False,
    reduce_range: bool = True,
) -> Path:
    """Write `variant` of the FP32 graph `fp32` to `out` (OpenVINO variants: `out` with suffix .xml;
    `weights_only`: NNCF INT8 compresses the weights and leaves the activations in float;
    `reduce_range`: ONNX Runtime INT8 uses 7-bit weights where the CPU lacks VNNI)."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if variant in OPENVINO_VARIANTS:
            return _openvino_variant(fp32, out.with_suffix(IR_SUFFIX), variant, calibration, weights_only)
        if variant == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True, op_block_list=FP16_KEEP_FLOAT32)
            onnx.save(model, str(out))
        elif variant == "int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(fp32),
                str(out),
                op_types_to_quantize=QUANTIZED_OPS,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=nodes_kept_in_float(onnx.load(str(fp32))),
                reduce_range=reduce_range and saturating_int8(),
            )
        elif variant == "int8-static":
            _quantize_static(fp32, out, calibration, method, reduce_range and saturating_int8())
        else:
            raise ValueError(f"unknown precision variant {variant!r}")
    except (InputError, ValueError):
        raise
    except Exception as exc:
        raise ExportError(f"{fp32.parent.name}: {variant} conversion failed: {exc}") from exc
    return out


OPENVINO_VARIANTS = ("bf16", "int8-nncf", "int8-nncf-nosq", "int8-nncf-weights")


def openvino_ir(fp32: Path, out: Path):
    """The ONNX graph `fp32` as OpenVINO IR in `out` (.xml and .bin) with FP32 weights: OpenVINO's
    save_model would store them as FP16 by default. Returns the converted ov.Model."""
    import onnx
    import openvino as ov

    model = ov.convert_model(str(fp32))
    # a port may carry an inner tensor's name too ('/vision_model/.../Cast_output_0'), and
    # OpenVINO (Triton's openvino backend among its users) reads any one of them: keep the graph's
    # own names, which are the Triton tensor names
    graph = onnx.load(str(fp32), load_external_data=False).graph
    own = {value.name for value in [*graph.input, *graph.output]}
    for port in [*model.inputs, *model.outputs]:
        names = port.get_names() & own
        if names:
            port.get_tensor().set_names(names)
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out), compress_to_fp16=False)
    return model


def _openvino_variant(fp32: Path, out: Path, variant: str, calibration: list[Feeds], weights_only: bool) -> Path:
    model = openvino_ir(fp32, out)
    if not variant.startswith("int8-nncf"):
        return out  # bf16: the FP32 IR, run with the BF16 hint
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    if variant == "int8-nncf-weights" or weights_only:
        quantized = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:
        if not calibration:
            raise InputError("INT8 quantization with NNCF needs calibration samples")
        advanced = None
        if variant == "int8-nncf-nosq":  # alpha -1 turns SmoothQuant off
            advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
        quantized = nncf.quantize(
            model,
            nncf.Dataset(calibration),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            advanced_parameters=advanced,
        )
    # the weights NNCF left in float stay FP32 (save_model would store them as FP16)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def runtime_precision(variant: str) -> str:
    """How an OpenVINO session computes a variant's graph (its precision hint)."""
    return "bf16" if variant == "bf16" else "int8" if variant.startswith("int8") else "fp32"


def saturating_int8() -> bool:
    """Whether this CPU lacks VNNI: ONNX Runtime's x86 INT8 kernels then multiply u8 by s8 with
    16-bit intermediate sums, which saturate on full-range weights (ONNX Runtime's documented
    remedy: `reduce_range`, 7-bit weights). Measured on Zen 3 (AVX2, no VNNI): SigLIP's static
    INT8 fell from passing to a text-tower cosine of 0.92 without it."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return not ({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def _quantize_static(fp32: Path, out: Path, calibration: list[Feeds], method: str, reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise InputError("INT8 static quantization needs calibration samples")
    prepared = out.with_name(out.stem + ".prepared.onnx")
    import onnx

    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    quantize_static(
        str(prepared),
        str(out),
        FeedReader(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=methods[method],
        nodes_to_exclude=nodes_kept_in_float(onnx.load(str(prepared))),
        reduce_range=reduce_range,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    prepared.unlink(missing_ok=True)


ELEMENTWISE = {"Mul", "Add", "Div", "Sub", "Pow", "Sqrt", "Cast", "Identity"}


def nodes_kept_in_float(model) -> list[str]:
    """MatMul/Gemm nodes that stay float: no constant weight (attention), or fed by an activation
    function through elementwise ops only (an MLP's down projection, e.g. x * 0.5 * (1 + erf(...)))."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in model.graph.node for o in n.output}

    def after_activation(tensor: str, hops: int = 8) -> bool:
        node = producer.get(tensor)
        if node is None or hops == 0:
            return False
        if node.op_type in ACTIVATION_FUNCTIONS:
            return True
        if node.op_type not in ELEMENTWISE:
            return False
        return any(after_activation(i, hops - 1) for i in node.input if i not in constants)

    kept = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        weights = [i for i in node.input if i in constants]
        activations = [i for i in node.input if i and i not in constants]
        if not weights or any(after_activation(a) for a in activations):
            kept.append(node.name)
    return kept


def compare_graph(
    module, onnx_file: Path, outputs: list[str], heldout: list[Feeds], runtime: Runtime = ONNX_RUNTIME
) -> tuple[dict[str, float], float]:
    """Variant vs the FP32 PyTorch module on held-out feeds, run as it will be served (`runtime`):
    cosine min/mean, max abs; and the median latency of one feed."""
    import torch

    session = runtime.session(onnx_file)
    names = [i.name for i in session.get_inputs()]
    all_cosines, max_abs, times = [], 0.0, []
    for feed in heldout:
        with torch.no_grad():
            expected = module(*[torch.from_numpy(feed[n]) for n in names])
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        start = time.perf_counter()
        actual = session.run(outputs, {n: feed[n] for n in names})
        times.append(time.perf_counter() - start)
        for want, got in zip(expected, actual):
            want = want.numpy()
            all_cosines.append(cosines(want, got))
            max_abs = max(max_abs, float(np.abs(want - got).max()))
    values = np.concatenate(all_cosines)
    stats = {"min_cosine": float(values.min()), "mean_cosine": float(values.mean()), "max_abs_error": max_abs}
    return stats, float(np.median(times) * 1000)


# Which variant `auto` keeps, by target: the first in this order that passes its accuracy report.
# A fixed table, not a timing taken during the build (on a shared machine that was noise: two
# builds of the same inputs kept different graphs). CPU: ONNX Runtime's dynamic INT8 ran 1.82x
# FP32 and static QDQ 0.96x on CLIP ViT-B/32 (scripts/bench_precision.py, docs/BENCHMARKS.md).
# GPU: TensorRT builds INT8 engines from the static QDQ graph (explicit quantization).
# OpenVINO: NNCF INT8 (with SmoothQuant, then without), then BF16.
PREFERENCE = {
    "cpu": ("int8-dynamic", "int8-static", "fp16"),
    "gpu": ("int8-static", "int8-dynamic", "fp16"),
    "openvino": ("int8-nncf", "int8-nncf-nosq", "int8-nncf-weights", "bf16"),
}


@dataclass(frozen=True)
class Decision:
    chosen: str
    rule: str
    order: tuple[str, ...]
    passed: dict[str, bool]

    def summary(self) -> str:
        return f"using {self.chosen} ({self.rule})"


def choose(reports: Mapping[str, AccuracyReport], force: bool, target: str = "cpu") -> Decision:
    """The variant to ship: the first of the target's preference order that passed its accuracy
    report (forced: the first built). Measured latencies are reported, never used."""
    order = tuple(v for v in PREFERENCE[target] if v in reports)
    passed = {v: reports[v].passed for v in order}
    candidates = [v for v in order if passed[v]]
    if candidates:
        rule = f"the first of {', '.join(order)} on {target} that passes its accuracy report"
        return Decision(candidates[0], rule, order, passed)
    if force:
        return Decision(
            order[0], f"none passed; --force keeps the first of {', '.join(order)} on {target}", order, passed
        )
    raise ExportError(
        "no reduced-precision variant passed its accuracy report: " + " | ".join(r.summary() for r in reports.values()),
        hint="see accuracy_report.json; use --force to build anyway, or --precision fp32",
    )


def split_files(files: list[T], heldout_share: float = 0.25) -> tuple[list[T], list[T]]:
    """Calibration and held-out items (files, texts, indices): every 1/share-th is held out (at least one of each)."""
    if len(files) < 2:
        raise InputError("calibration data needs at least 2 files (some are held out to judge accuracy)")
    step = max(2, round(1 / heldout_share))
    return [f for i, f in enumerate(files) if (i + 1) % step], files[step - 1 :: step]


def image_feeds(images: list[bytes], image_processor, tensor: str, batch: int = 4) -> list[Feeds]:
    """Encoded images -> batches of the encoder's pixel input, preprocessed as the model's processor does."""
    from tritonkit.preprocessing.image import PIL_FORMATS, ImageRecipe, image_bytes_to_pixels

    recipe = ImageRecipe.from_processor(image_processor).with_options(formats=PIL_FORMATS)
    pixels = np.stack([image_bytes_to_pixels(data, recipe) for data in images])
    return [{tensor: pixels[i : i + batch]} for i in range(0, len(pixels), batch)]


def data_files(directory: Path, suffixes: Iterable[str]) -> list[Path]:
    suffixes = {s.lower() for s in suffixes}
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


class RecordingSession:
    """Wraps an ONNX Runtime session and keeps (a sample of) the feeds it runs: the calibration
    inputs of graphs that only run inside a loop, such as a decoder step."""

    def __init__(self, session, keep_every: int = 1, limit: int = 64):
        self.session = session
        self.keep_every = keep_every
        self.limit = limit
        self.feeds: list[Feeds] = []
        self._calls = 0

    def run(self, outputs, feed):
        if self._calls % self.keep_every == 0 and len(self.feeds) < self.limit:
            self.feeds.append({k: np.array(v) for k, v in feed.items()})
        self._calls += 1
        return self.session.run(outputs, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


def evaluate(
    variant: str,
    exports: Mapping[str, OnnxExport],
    files: Mapping[str, Path],
    data: PrecisionData,
    thresholds: dict[str, float],
    task_check: Callable[[Mapping[str, Path], Runtime], dict[str, float]] | None = None,
    engine: str = "onnxruntime",
) -> AccuracyReport:
    """The accuracy report of one variant, run on `engine` as it will be served: every graph
    against FP32 PyTorch, then the family's task-level check (which also fills failures by its
    own thresholds)."""
    runtime = Runtime(engine, runtime_precision(variant))
    graphs, latency, failures = {}, {}, []
    for role, export in exports.items():
        stats, ms = compare_graph(
            export.module, files[role], [t.name for t in export.outputs], data.heldout[role], runtime
        )
        graphs[role], latency[role] = stats, ms
        if stats["min_cosine"] < thresholds["min_cosine"]:
            failures.append(f"{role} min cosine {stats['min_cosine']:.4f} < {thresholds['min_cosine']}")
    task = task_check(files, runtime) if task_check else {}
    for metric in ("wer", "eer"):  # a task metric's rise over FP32's, bounded by the family (word, equal error rate)
        rise, bound = task.get(f"{metric}_increase"), thresholds.get(f"max_{metric}_increase")
        if rise is not None and bound is not None and rise > bound:
            failures.append(f"{metric.upper()} rises by {rise:.3f} > {bound}")
    return AccuracyReport(variant, data.source, graphs, task, thresholds, failures, latency)
