"""What a model family spec is: the single source of tensor names, dims, tolerances and batching.

A spec describes a family as *exports* (PyTorch modules that become ONNX encoders) and
*pipelines* (ensembles: a chain of Triton models wired by tensor name). Export, validation,
config generation, the repository writer and the tests all read from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from tritonkit.contracts import Contract
from tritonkit.engines import graph_files, graph_name
from tritonkit.errors import ConfigError
from tritonkit.triton_config import Batching, Tensor


@dataclass(frozen=True)
class Tolerance:
    """How close an export must be to PyTorch: both bounds must hold."""

    max_abs: float
    min_cosine: float = 0.9999


@dataclass
class OnnxExport:
    """A PyTorch module to export; its ONNX input/output names are the Triton tensor names."""

    role: str
    module: Any  # torch.nn.Module
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    # Several input batches (of different batch sizes) used to trace and to validate the export.
    sample_inputs: list[dict[str, Any]]
    tolerance: Tolerance
    opset: int = 17
    # The name of each tensor's first axis (default "batch"): tensors whose first axes differ in
    # size name them apart (Qwen-VL's patches and visual tokens).
    first_axis: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)  # an artefact shared by two stages is made once (compared by identity)
class Artefact:
    """Files a stage ships that the build makes: `pipelines()` only describes them, and the build
    makes each one as a step of its own, printing `what` (serialized DALI graphs, TensorRT plans,
    saved tokenizers and language models). `make(folder)` writes into `folder` and returns the
    files by their name in the model's version directory."""

    what: str
    make: Callable[[Path], Mapping[str, Path]]


@dataclass(frozen=True)
class StageMemory:
    """Memory facts of one stage for `tritonkit plan` (written as its `tritonkit_plan_memory`)."""

    # the fixed resident memory (MB) of its CPU stub once warm, beyond the weights, workspace and
    # batch buffers the plan computes: the interpreter, the template's libraries, tokenizers, DALI's
    # buffers. Measured with scripts/soak.py and `tritonkit plan REPO --measure REPORT`; None: the
    # template's default.
    fixed_mb: float | None = None
    # How far apart soaks of the same repository measured this stage, as a fraction of its total
    # (DALI's buffers grow with the images a run happened to batch): the CI memory gate allows a
    # stage the larger of this and its usual 20%. 0: as steady as the gate assumes.
    spread: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StageMemory:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Stage:
    """One Triton model in an ensemble chain; its name is `<NAME>_<role>`.

    A Python-backend stage names the `tritonkit.stages` module its `model.py` binds
    (`template`); other backends (dali, onnxruntime) bring their model file in `files` or make it
    in an artefact. `graphs` names the export role of each graph file it ships, so that graph's
    export and accuracy reports go beside it."""

    role: str
    template: str | None  # module name in tritonkit.stages (Python backend only)
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    batching: Batching
    parameters: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, Path] = field(default_factory=dict)  # copied into the version dir
    backend: str = "python"
    kind: str = "KIND_CPU"
    config_extra: Mapping[str, Any] = field(default_factory=dict)  # more ModelConfig fields
    artefacts: tuple[Artefact, ...] = ()
    graphs: Mapping[str, str] = field(default_factory=dict)  # file in the version dir -> export role
    # Models this stage calls itself (Triton's BLS) rather than the ensemble: written beside it, and
    # named to it in the parameter `<role>_model` (e.g. Whisper's preprocessing calls its VAD).
    callees: tuple[Stage, ...] = ()

    def __post_init__(self):
        if (self.backend == "python") != (self.template is not None):
            raise ConfigError(f"stage {self.role!r}: a template is needed by, and only by, the Python backend")


TARGETS = ("cpu", "gpu")
# A stage's parameter naming worst-case values of its graphs' symbolic dims (JSON {dim: size});
# `tritonkit plan` sizes activation memory with them (the batch dim is the max batch size).
PLAN_DIMS_PARAMETER = "tritonkit_plan_dims"
# Graphs a stub runs in slices of fewer rows than its batch (JSON {file: rows}), for `tritonkit plan`.
GRAPH_ROWS_PARAMETER = "tritonkit_plan_graph_rows"
SERVER_MEMORY_ROLE = "server"  # FamilySpec.memory's key for tritonserver's share
# A stage's StageMemory (JSON), for `tritonkit plan`.
PLAN_MEMORY_PARAMETER = "tritonkit_plan_memory"
# A CPU encoder's rows per graph run (Batching.rows_per_run); `tritonkit plan` sizes its workspace by it.
ROWS_PER_RUN_PARAMETER = "rows_per_run"
PREPROCESSING = ("dali", "python")
ENGINES = ("onnxruntime", "onnxruntime-trt", "tensorrt", "openvino")
GPU_ENGINES = ("onnxruntime-trt", "tensorrt")
# The thread-count parameter of Triton's CPU backends: a KIND_CPU model on one gets the build
# machine's cores over its instance count (neither backend has an 'all cores' value).
NATIVE_THREAD_PARAMETERS = {"openvino": "INFERENCE_NUM_THREADS", "onnxruntime": "intra_op_thread_count"}


def flag(help: str, *declarations: str, default: Any = None) -> Any:
    """A field of a family's options: `tritonkit build` gives it a flag (`declarations`, else
    --field-name) with this help."""
    return field(default=default, metadata={"help": help, "declarations": declarations})


@dataclass(frozen=True)
class FamilyOptions:
    """The build options only some families take. A family's `options_class` is its own subclass;
    `tritonkit build` derives a flag from every field of every family's class (`flag`) and refuses a
    flag the family being built does not take. None leaves a field to the model's defaults."""

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class ImageOptions(FamilyOptions):
    """How a family that takes images decodes and checks them (tritonkit.preprocessing.image)."""

    resize_mode: str | None = flag("Images: crop (as CLIP), fit (stretch) or pad (letterbox).")
    image_formats: str | None = flag("Accepted image formats, e.g. jpeg,png,webp,bmp,tiff (gif: python only).")
    max_image_bytes: int | None = flag("Largest accepted encoded image.")
    max_image_pixels: int | None = flag("Largest accepted image area (decompression bombs fail).")
    max_resize_pixels: int | None = flag(
        "Largest image area after the resize before the crop (very elongated images fail; default 16000000)."
    )
    exif_orientation: bool | None = flag(
        "Turn images upright by their EXIF orientation (default: yes).",
        "--exif-orientation/--ignore-exif-orientation",
    )
    jpeg_draft: bool | None = flag(
        "--preprocessing python: decode large JPEGs at a reduced DCT scale (see docs/BENCHMARKS.md).",
        "--jpeg-draft/--no-jpeg-draft",
    )

    def recipe_options(self) -> dict[str, Any]:
        """As `ImageRecipe.with_options` takes them (None keeps the model's own)."""
        formats = tuple(f.strip() for f in self.image_formats.split(",") if f.strip()) if self.image_formats else None
        return {
            "resize_mode": self.resize_mode,
            "formats": formats,
            "max_bytes": self.max_image_bytes,
            "max_pixels": self.max_image_pixels,
            "max_resize_pixels": self.max_resize_pixels,
            "exif_orientation": self.exif_orientation,
            "jpeg_draft": self.jpeg_draft,
        }


@dataclass(frozen=True)
class BuildOptions:
    """What a build may choose beyond the model: where it runs and how inputs are handled.

    `target` cpu writes Python-backend models only (what runs here); gpu writes DALI-backend
    preprocessing and ONNX Runtime-backend encoders on KIND_GPU instances. `preprocessing` dali
    runs the DALI pipeline definitions (on CPU inside Python-backend models for target cpu);
    python runs PIL and numpy instead (exact transformers parity, CPU only). `family` holds the
    options of the family being built (its `options_class`)."""

    target: str = "cpu"
    preprocessing: str = "dali"
    family: FamilyOptions | None = None
    max_request_bytes: int | None = None  # all encoded inputs of one request; None: the family's default
    dali_threads: int = 1
    # how the graphs run: ONNX Runtime or OpenVINO (cpu); ONNX Runtime, its TensorRT provider, or TensorRT plans (gpu)
    engine: str = "onnxruntime"
    precision: str = "fp32"  # what the encoders' graphs hold (set by the build from the chosen variant)
    # cpu: encoders on Triton's own onnxruntime / openvino backends (NGC containers have them; the
    # bundled server here does not), preprocessing and decoders in the Python backend as always
    native_backends: bool = False

    def __post_init__(self):
        from tritonkit.errors import InputError

        if self.target not in TARGETS:
            raise InputError(f"--target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.preprocessing not in PREPROCESSING:
            raise InputError(f"--preprocessing {self.preprocessing!r}: use one of {', '.join(PREPROCESSING)}")
        if self.target == "gpu" and self.preprocessing != "dali":
            raise InputError("--target gpu preprocesses with DALI; leave out --preprocessing python")
        if self.dali_threads < 1:
            raise InputError("--dali-threads must be >= 1")
        if self.max_request_bytes is not None and self.max_request_bytes < 1:
            raise InputError(f"--max-request-bytes must be >= 1, got {self.max_request_bytes}")
        if self.engine not in ENGINES:
            raise InputError(f"--engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.engine in GPU_ENGINES and not self.gpu:
            raise InputError(f"--engine {self.engine} is for --target gpu")
        if self.engine == "openvino" and self.gpu:
            raise InputError("--engine openvino is for --target cpu")
        if self.native_backends and self.gpu:
            raise InputError("--native-backends is for --target cpu (GPU repositories always use Triton's backends)")

    @property
    def gpu(self) -> bool:
        return self.target == "gpu"

    @property
    def image(self) -> ImageOptions:
        """The image options of a family that takes images (defaults for any other)."""
        return self.family if isinstance(self.family, ImageOptions) else ImageOptions()


@dataclass(frozen=True)
class Pipeline:
    """An ensemble `<NAME>_<role>` (or `<NAME>` when role is empty): stages wired by tensor name."""

    role: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    stages: tuple[Stage, ...]
    # Deterministic, small outputs (embeddings): a repeated input is answered from Triton's cache.
    response_cache: bool = False

    def __post_init__(self):
        available = {t.name: t for t in self.inputs}
        for stage in self.stages:
            for tensor in stage.inputs:
                source = available.get(tensor.name)
                if source is None and tensor.optional:  # left out by this ensemble (a chat turn without images)
                    continue
                if source is None:
                    raise ConfigError(
                        f"pipeline {self.role!r}: {stage.role} needs {tensor.name}, which nothing produces"
                    )
                if source.optional and not tensor.optional:
                    raise ConfigError(
                        f"pipeline {self.role!r}: {stage.role} requires {tensor.name}, which requests may leave out"
                    )
                if (source.dtype, source.dims) != (tensor.dtype, tensor.dims):
                    raise ConfigError(
                        f"pipeline {self.role!r}: {tensor.name} is {source.dtype}{list(source.dims)} where it is made "
                        f"but {stage.role} expects {tensor.dtype}{list(tensor.dims)}"
                    )
            available.update({t.name: t for t in stage.outputs})
        missing = [t.name for t in self.outputs if t.name not in available]
        if missing:
            raise ConfigError(f"pipeline {self.role!r}: outputs {missing} are produced by no stage")


class FamilySpec:
    """Base of every registered family: its facts as class attributes, its graphs and ensembles as
    three hooks (`exports`, `pipelines`, `make_tiny`). A variant subclasses its parent and sets
    only what differs (`SiglipSpec(ClipSpec)`)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # What its repositories serve (tritonkit.contracts): the tensors clients send and receive.
    contract: ClassVar[Contract]
    # transformers `model_type`s this family builds (config.json); another fails before loading.
    model_types: ClassVar[tuple[str, ...]] = ()
    # What `load` reads: the transformers model class, and per field of `loaded_class` the
    # transformers class (usually an Auto class) that loads that processor.
    model_class: ClassVar[str] = ""
    processor_classes: ClassVar[Mapping[str, str]] = {}
    loaded_class: ClassVar[type] = object
    # How close each export role's ONNX graph must be to PyTorch.
    tolerances: ClassVar[Mapping[str, Tolerance]] = {}
    # Default batching per stage role; the CLI may override fields for every stage.
    batching: ClassVar[Mapping[str, Batching]] = {}
    # What one request may send in all (its encoded files and strings); --max-request-bytes overrides.
    max_request_bytes: ClassVar[int] = 64 * 1024 * 1024
    # The build options only this family takes (`tritonkit build` derives their flags).
    options_class: ClassVar[type[FamilyOptions]] = FamilyOptions

    def load(self, source: str, *, trust_remote_code: bool = False) -> Any:
        """The PyTorch model and its processors from a Hub id or a local save_pretrained directory."""
        import transformers

        from tritonkit.hf import from_pretrained

        kwargs = {"trust_remote_code": trust_remote_code}
        model = from_pretrained(getattr(transformers, self.model_class), source, f"{self.name} model", **kwargs)
        processors = {
            field: from_pretrained(getattr(transformers, loader), source, field.replace("_", " "), **kwargs)
            for field, loader in self.processor_classes.items()
        }
        return self.loaded_class(model=model.eval(), **processors)

    def tolerance(self, role: str) -> Tolerance:
        if role not in self.tolerances:
            raise ConfigError(f"family {self.name!r} has no tolerance for its export {role!r}")
        return self.tolerances[role]

    @staticmethod
    def make_tiny(directory: Path) -> Path:
        """Save a small random-initialised model of this family (real architecture and tokenizer)."""
        raise NotImplementedError

    def check_model_type(self, source: str) -> None:
        """A local model of another family fails with its name, not deep inside transformers."""
        import json

        from tritonkit.errors import ModelSourceError

        config = Path(source).expanduser() / "config.json"
        if not self.model_types or not config.is_file():
            return
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return  # the loader reports an unreadable config
        if model_type and model_type not in self.model_types:
            owner = next((n for n, s in _REGISTRY.items() if model_type in s.model_types), None)
            raise ModelSourceError(
                f"--model {source} is a {model_type!r} model, not {self.name}",
                hint=f"build it with `tritonkit build {owner}`"
                if owner
                else f"{self.name} builds {', '.join(self.model_types)} models",
            )

    def fit(self, loaded: Any, options: BuildOptions) -> list[str]:
        """Adapt the loaded processors to the build's options before anything is exported or written;
        returns what changed, one line each, for the build's progress."""
        return []

    def family_options(self, options: BuildOptions) -> Any:
        """The build's options of this family (`options_class`'s defaults when none were given)."""
        from tritonkit.errors import InputError

        if options.family is None:
            return self.options_class()
        if type(options.family) is not self.options_class:
            raise InputError(
                f"{type(options.family).__name__} are not {self.name}'s options: build it with {self.options_class.__name__}"
            )
        return options.family

    def exports(self, loaded: Any) -> list[OnnxExport]:
        raise NotImplementedError

    def pipelines(
        self, loaded: Any, onnx_files: Mapping[str, Path], options: BuildOptions = BuildOptions()
    ) -> list[Pipeline]:
        """The ensembles to serve, described (nothing is written: files to make are `Artefact`s);
        `onnx_files` maps export role -> validated ONNX file."""
        raise NotImplementedError

    # Per stage role: what `tritonkit plan` needs beyond the graphs to predict its memory; under
    # SERVER_MEMORY_ROLE, what the family's requests add to tritonserver's own (written to its
    # first ensemble).
    memory: ClassVar[Mapping[str, StageMemory]] = {}

    def memory_for(self, options: BuildOptions) -> Mapping[str, StageMemory]:
        """The stages' measured fixed memory for a build with `options` (a family whose stage
        differs by option, such as its preprocessing engine, overrides it); on a GPU, the stages
        every image family shares (`GPU_SHARED_STAGE_MEMORY`) unless the family measured its own."""
        return {**(GPU_SHARED_STAGE_MEMORY if options.gpu else {}), **self.memory}

    def stage_batching(self, role: str) -> Batching:
        return self.batching.get(role, Batching())

    # -- reduced precision (tritonkit.precision) -----------------------------------------
    # Per precision ("fp16", "bf16", "int8"): the bounds a variant's accuracy report must meet.
    precision_thresholds: ClassVar[Mapping[str, Mapping[str, float]]] = {}
    # Export roles whose NNCF INT8 keeps activations in float and stores INT8 weights (a decoder
    # step, whose activations INT8 does not hold and whose small batches wait on weight reads).
    int8_weights_only: ClassVar[frozenset[str]] = frozenset()
    # ONNX Runtime INT8 with 7-bit weights on CPUs without VNNI (tritonkit.precision.saturating_int8)
    int8_reduce_range: ClassVar[bool] = True
    # Export roles kept in FP32 in every precision variant (not converted, not judged): graphs run
    # once per answer whose outputs are searched, not sampled (Whisper's word alignment).
    full_precision_roles: ClassVar[frozenset[str]] = frozenset()

    def precision_data(
        self,
        loaded: Any,
        exports: Mapping[str, OnnxExport],
        onnx_files: Mapping[str, Path],
        calibration_dir: Path | None,
    ):
        """Calibration and held-out inputs of every export (a `tritonkit.precision.PrecisionData`)."""
        raise NotImplementedError(f"{self.name}: reduced precision is not supported")

    def task_check(self, loaded: Any, data, onnx_files: Mapping[str, Path]):
        """A callable(variant files) -> task metrics against FP32 (e.g. WER), or None."""
        return None


_REGISTRY: dict[str, type[FamilySpec]] = {}


def register(cls: type[FamilySpec]) -> type[FamilySpec]:
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__name__} has no family name")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"family {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def registry() -> Mapping[str, type[FamilySpec]]:
    return dict(_REGISTRY)


def dali_stage(
    role: str,
    graph,
    inputs: tuple[Tensor, ...],
    outputs: tuple[Tensor, ...],
    batching: Batching,
    options: BuildOptions,
    *,
    image_recipe=None,
    warmup: Mapping[str, tuple[int, ...]] | None = None,
) -> Stage:
    """A preprocessing stage from a DALI graph definition (`tritonkit.preprocessing.dali`).

    Target gpu: a DALI-backend model with GPU operators. Target cpu: the same graph with CPU
    operators, run by the `dali_pipeline` Python-backend template (which also checks images
    per request when given `image_recipe`). `warmup`: every input at its largest shape, run
    once at load (CPU), so DALI's buffers start at the size they would otherwise grow to."""
    serialized = dali_artefact(graph, batching.max_batch_size, options)
    parameters = {"num_threads": str(options.dali_threads)}
    if options.gpu:
        return Stage(
            role, None, inputs, outputs, batching, parameters, backend="dali", kind="KIND_GPU", artefacts=(serialized,)
        )
    if image_recipe is not None:
        parameters["image_recipe"] = image_recipe.to_json()
    if batching.rows_per_run:
        parameters[ROWS_PER_RUN_PARAMETER] = str(batching.rows_per_run)
    if warmup:
        parameters["warmup"] = json.dumps({name: list(shape) for name, shape in warmup.items()})
    return Stage(role, "dali_pipeline", inputs, outputs, batching, parameters, artefacts=(serialized,))


def dali_artefact(graph, batch_size: int, options: BuildOptions) -> Artefact:
    """`model.dali`: `graph` serialized with GPU operators for a GPU build, CPU ones otherwise."""
    from tritonkit.preprocessing.dali import serialize

    device = "gpu" if options.gpu else "cpu"

    def make(folder: Path) -> Mapping[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.dali"
        path.write_bytes(serialize(graph, device, batch_size, options.dali_threads))
        return {"model.dali": path}

    return Artefact(f"serialize its DALI graph with {device.upper()} operators", make)


def saved_pretrained(what: str, name: str, saver: Callable[[str], Any]) -> Artefact:
    """An artefact that `save_pretrained`s a tokenizer, processor or model into the folder `name`."""

    def make(folder: Path) -> Mapping[str, Path]:
        saver(str(folder / name))
        return {name: folder / name}

    return Artefact(f"save the {what}", make)


def image_recipe_for(image_processor, options: BuildOptions):
    """The model's own image processor settings, with the build's image options."""
    from tritonkit.errors import InputError
    from tritonkit.preprocessing.image import DALI_FORMATS, ImageRecipe

    recipe = ImageRecipe.from_processor(image_processor).with_options(**options.image.recipe_options())
    undecodable = sorted(set(recipe.formats) - set(DALI_FORMATS))
    if options.preprocessing == "dali" and recipe.jpeg_draft:
        raise InputError("--jpeg-draft decodes with PIL: add --preprocessing python (DALI has no scaled JPEG decode)")
    if options.preprocessing == "dali" and undecodable:
        raise InputError(
            f"DALI does not decode {', '.join(undecodable)} images",
            hint="leave them out of --image-formats, or use --preprocessing python (CPU only)",
        )
    return recipe


# The fixed memory of the stages GPU builds of image families take from here rather than define
# (the per-request image checks before DALI: a small stub with PIL, as measured on CPU stubs).
GPU_SHARED_STAGE_MEMORY: Mapping[str, StageMemory] = {"image_check": StageMemory(fixed_mb=40)}


def image_preprocess_stages(
    recipe, image: Tensor, checked: Tensor, pixels: Tensor, batching: Batching, options: BuildOptions
) -> tuple[Stage, ...]:
    """Encoded image bytes -> pixel values: PIL/numpy (`--preprocessing python`), DALI CPU
    operators in the Python backend (target cpu), or per-request header checks in Python followed
    by the DALI backend (target gpu: DALI fails a whole batch on one bad image)."""
    from tritonkit.preprocessing.dali import image_graph

    if options.preprocessing == "python":
        return (
            Stage("image_preprocess", "image_preprocess", (image,), (pixels,), batching, {"recipe": recipe.to_json()}),
        )
    if options.gpu:
        return (
            Stage("image_check", "image_check", (image,), (checked,), batching, {"image_recipe": recipe.to_json()}),
            dali_stage("image_preprocess", image_graph(recipe, checked.name), (checked,), (pixels,), batching, options),
        )
    return (
        dali_stage(
            "image_preprocess",
            image_graph(recipe, image.name),
            (image,),
            (pixels,),
            batching,
            options,
            image_recipe=recipe,
        ),
    )


def engine_parameters(graph: Path, stem: str, options: BuildOptions) -> dict[str, str]:
    """What a Python-backend stage needs to run `graph` as the build chose: its file (`STEM_file`)
    and, on OpenVINO, the engine and the precision it computes in."""
    from tritonkit.precision import runtime_precision

    parameters = {f"{stem}_file": graph_name(graph, stem)}
    if options.engine == "openvino":
        parameters.update(engine="openvino", inference_precision=runtime_precision(options.precision))
    return parameters


def native_encoder_stage(role: str, inputs, outputs, batching: Batching, graph: Path, options: BuildOptions) -> Stage:
    """An encoder on Triton's own CPU backend: onnxruntime (model.onnx) or openvino (model.xml and
    model.bin, with its precision in the backend's parameters; the repository writer adds the
    threads per instance, NATIVE_THREAD_PARAMETERS)."""
    parameters: dict[str, str] = {}
    if options.engine == "openvino":
        parameters = {"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
        if options.precision == "bf16":
            parameters["HINT_BF16"] = "YES"
    backend = "openvino" if options.engine == "openvino" else "onnxruntime"
    return Stage(
        role,
        None,
        inputs,
        outputs,
        batching,
        parameters,
        graph_files(graph, "model"),
        backend=backend,
        graphs={graph_name(graph, "model"): role},
    )


def encoder_stage(role: str, inputs, outputs, batching: Batching, onnx_file: Path, options: BuildOptions) -> Stage:
    """An ONNX encoder. CPU: ONNX Runtime inside the Python backend. GPU: the ONNX Runtime backend
    (optionally with its TensorRT execution accelerator), or a TensorRT plan that the build makes,
    each on KIND_GPU with a warmup request."""
    from tritonkit.triton_config import warmup

    if not options.gpu:
        if options.native_backends:
            return native_encoder_stage(role, inputs, outputs, batching, onnx_file, options)
        parameters = {ROWS_PER_RUN_PARAMETER: str(batching.rows_per_run)} if batching.rows_per_run else {}
        parameters.update(engine_parameters(onnx_file, "model", options))
        return Stage(
            role,
            "onnx_encoder",
            inputs,
            outputs,
            batching,
            parameters,
            graph_files(onnx_file, "model"),
            graphs={graph_name(onnx_file, "model"): role},
        )
    extra = warmup(inputs)
    if options.engine == "tensorrt":
        from tritonkit.tensorrt import EngineProfile

        preferred = batching.preferred_batch_sizes or (batching.max_batch_size,)
        profile = EngineProfile(1, min(max(preferred), batching.max_batch_size), batching.max_batch_size)
        precision = {"int8-static": "int8", "fp16": "fp16"}.get(options.precision, "fp32")

        def make(folder: Path) -> Mapping[str, Path]:
            from tritonkit.tensorrt import build_engine

            engine = build_engine(Path(onnx_file), folder, inputs, profile, precision=precision)
            return {"model.plan": engine.plan, "builder.log": engine.log, "reproduce.sh": engine.reproduce}

        plan = Artefact(
            f"build a {precision.upper()} TensorRT plan (batch {profile.min_batch}-{profile.max_batch})", make
        )
        return Stage(
            role,
            None,
            inputs,
            outputs,
            batching,
            {},
            backend="tensorrt",
            kind="KIND_GPU",
            config_extra=extra,
            artefacts=(plan,),
            graphs={"model.plan": role},
        )
    if options.engine == "onnxruntime-trt":
        mode = {"int8-static": "INT8", "fp16": "FP16"}.get(options.precision, "FP32")
        extra["optimization"] = {
            "execution_accelerators": {
                "gpu_execution_accelerator": [{"name": "tensorrt", "parameters": {"precision_mode": mode}}]
            }
        }
    return Stage(
        role,
        None,
        inputs,
        outputs,
        batching,
        {},
        {"model.onnx": onnx_file},
        backend="onnxruntime",
        kind="KIND_GPU",
        config_extra=extra,
        graphs={"model.onnx": role},
    )
