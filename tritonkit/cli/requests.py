"""Commands that send requests to a running server: infer, transcribe, chat, preprocess."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from tritonkit.cli.common import (
    Url,
    app,
    console,
)
from tritonkit.errors import InputError


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
            record: dict = {"input": item, "outputs": {name: jsonable(value[0]) for name, value in result.items()}}
            if embedding is not None:
                record["embedding"] = record["outputs"][embedding]
            print(json.dumps(record, ensure_ascii=False))
            continue
        print(f"{item}:")
        for name, output in result.items():
            print(f"  {name}: {summary(output[0])}")
    if save:
        if len(embeddings) != len(inputs):
            raise InputError(f"--save needs one float output per input from {model}, and every input answered")
        np.save(save, np.stack(embeddings))
    if failed:
        raise typer.Exit(2)


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
    diarize: Annotated[
        bool,
        typer.Option(help="Who spoke when (NAME_diarize; build with --diarize): a speaker per segment and word."),
    ] = False,
    num_speakers: Annotated[int | None, typer.Option(help="--diarize: exactly this many speakers.")] = None,
    min_speakers: Annotated[int | None, typer.Option(help="--diarize: at least this many speakers.")] = None,
    max_speakers: Annotated[int | None, typer.Option(help="--diarize: at most this many speakers.")] = None,
    known_speaker: Annotated[
        list[str] | None,
        typer.Option(help="--diarize: NAME=CLIP, a 2-10 s clip of a speaker to call NAME (repeatable, up to 4)."),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="txt, json, srt, vtt, verbose_json (these four decode timestamps) or rttm (speaker turns, --diarize).",
        ),
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
    Speakers: tritonkit transcribe meeting.wav --diarize --format rttm --known-speaker ann=ann.wav
    """

    from tritonkit.client import TritonkitClient

    formats = ("txt", "json", "srt", "vtt", "verbose_json", "rttm")
    if output_format not in formats:
        raise InputError(f"--format {output_format!r}: use one of {', '.join(formats)}")
    speaker_flags = (num_speakers, min_speakers, max_speakers, known_speaker)
    if not diarize and (output_format == "rttm" or any(v is not None for v in speaker_flags)):
        raise InputError("--format rttm and the speaker options need --diarize (and a build with --diarize)")
    if diarize and stream:
        raise InputError("--diarize answers whole files: leave out --stream")
    timed = output_format != "txt" or diarize
    if max_words_per_cue is not None and max_words_per_cue < 1:
        raise InputError(f"--max-words-per-cue {max_words_per_cue}: use 1 or more")
    word_cued = max_words_per_cue is not None or highlight_words
    if word_cued and output_format not in ("srt", "vtt"):
        raise InputError("--max-words-per-cue and --highlight-words shape subtitles: use them with --format srt or vtt")
    word_timestamps = word_timestamps or word_cued
    cues = SubtitleCues(max_words_per_cue, highlight_words)
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
    if diarize:
        options |= speaker_options(num_speakers, min_speakers, max_speakers, known_speaker or [])
        model = f"{model}_diarize"
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
        text = rendered_transcript(path, transcript, output_format, word_timestamps, show_language, cues)
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            written = output_dir / f"{path.stem}.{output_format.replace('verbose_', '')}"
            text = text.removesuffix("\n") if output_format == "rttm" else text
            written.write_text(text if text.endswith("\n") else text + "\n")
            print(written)
        elif output_format == "txt":
            print(f"{path}: {text}" if len(files) > 1 else text)
        else:
            print(text)


def speaker_options(
    num_speakers: int | None, min_speakers: int | None, max_speakers: int | None, known: list[str]
) -> dict[str, Any]:
    """NAME_diarize's options from the command line (--known-speaker NAME=CLIP read here)."""
    names, clips = [], []
    for given in known:
        name, _, clip = given.partition("=")
        if not name or not clip:
            raise InputError(f"--known-speaker {given!r}: give NAME=CLIP, e.g. ann=ann.wav")
        if not Path(clip).is_file():
            raise InputError(f"--known-speaker {given!r}: no such file {clip}")
        names.append(name)
        clips.append(Path(clip).read_bytes())
    return dict(
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
        known_speaker_names=tuple(names) or None,
        known_speaker_references=tuple(clips) or None,
    )


@dataclass(frozen=True)
class SubtitleCues:
    """How srt and vtt cues are cut: by segment, by at most `max_words` words, or a cue a word."""

    max_words: int | None = None
    highlight_words: bool = False

    def of(self, segments: list[dict], words: list[dict]) -> list[dict]:
        from tritonkit import subtitles

        if self.highlight_words:
            return subtitles.highlighted_cues(segments, words)
        if self.max_words is not None:
            return subtitles.word_cues(words, self.max_words)
        return segments


def rendered_transcript(
    path: Path, transcript, output_format: str, word_timestamps: bool, show_language: bool, cues: SubtitleCues
) -> str:
    """One file's transcript in `output_format` (txt, json, srt, vtt, verbose_json or rttm);
    diarized, each segment and word carries its speaker (txt: a line per segment, "A: ...")."""
    from tritonkit import diarization, subtitles

    def fields(item) -> dict:  # a speaker only where there is one (NAME_diarize)
        return {k: v for k, v in asdict(item).items() if k != "speaker" or v}

    segments = [fields(s) for s in transcript.segments]
    words = [fields(w) | {"start": round(w.start, 3), "end": round(w.end, 3)} for w in transcript.words]
    segments = cues.of(segments, words)
    if output_format == "rttm":
        names = list(dict.fromkeys(name for _, _, name in transcript.turns))
        turns = [diarization.Turn(a, b, names.index(name)) for a, b, name in transcript.turns]
        return diarization.rttm(turns, path.stem, names)
    if output_format == "txt":
        if transcript.turns:
            return "\n".join(f"{s['speaker']}: {s['text'].strip()}" for s in segments)
        return f"[{transcript.language}] {transcript.text}" if show_language else transcript.text
    if output_format == "srt":
        return subtitles.srt(segments)
    if output_format == "vtt":
        return subtitles.vtt(segments)
    document: dict[str, object] = {"text": transcript.text, "language": transcript.language}
    if output_format == "verbose_json":  # times to the millisecond, not float32's 5.440000057220459
        rounded = [{**s, "start": round(s["start"], 3), "end": round(s["end"], 3)} for s in segments]
        document |= {"duration": subtitles.duration(path.read_bytes()), "segments": rounded}
    if word_timestamps:
        document["words"] = words
    return json.dumps(document, ensure_ascii=False)


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
            save: Any = np.savez  # numpy 2's stubs read the names as its keyword arguments
            save(out.with_suffix(".npz"), **tensors)
            console.print(f"saved {', '.join(tensors)} to {out.with_suffix('.npz')}")
        else:
            np.save(out, next(iter(tensors.values())))
            console.print(f"saved {next(iter(tensors))} to {out}")


def jsonable(value):
    import numpy as np

    if value.dtype == object:
        decoded = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]
        return decoded[0] if value.size == 1 else decoded
    if value.size == 1:
        return value.reshape(-1)[0].item()
    return np.asarray(value).tolist()


def summary(value) -> str:
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
