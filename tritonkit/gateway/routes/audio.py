"""POST /v1/audio/transcriptions and /v1/audio/translations: an uploaded file through a
transcription build's ensemble, answered in OpenAI's formats (json, text, srt, vtt, verbose_json
with segments and words, diarized_json with speakers through NAME_diarize), or streamed as
transcript.text events."""

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.datastructures import FormData

from tritonkit import contracts as c
from tritonkit import subtitles
from tritonkit.gateway import realtime
from tritonkit.gateway.context import EXTENSIONS, Gateway, conform, data_url_bytes, gateway_of
from tritonkit.gateway.openapi import form_instance
from tritonkit.gateway.triton import ApiError
from tritonkit.gateway.wire import anext_or_none, byte_row, first_text, server_sent_event

router = APIRouter()
AUDIO_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
AUDIO_TOKENS_PER_WINDOW = 1500  # Whisper's encoder: 1,500 positions a 30 s window


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request):
    return await audio(request, "transcribe")


@router.post("/v1/audio/translations")
async def translations(request: Request):
    return await audio(request, "translate")


@dataclass(frozen=True)
class AudioAnswer:
    """How the request wants its answer."""

    task: str
    response_format: str
    granularities: tuple[str, ...]
    streamed: bool

    @property
    def timed(self) -> bool:
        return self.response_format in ("srt", "vtt", "verbose_json", "diarized_json")

    @property
    def diarized(self) -> bool:
        return self.response_format == "diarized_json"

    @property
    def words(self) -> bool:
        return "word" in self.granularities


async def audio(request: Request, task: str):
    gateway = gateway_of(request)
    form = await request.form()
    schema = "CreateTranscriptionRequest" if task == "transcribe" else "CreateTranslationRequest"
    fields = [(key, value) for key, value in form.multi_items() if key.removesuffix("[]") not in EXTENSIONS[schema]]
    conform(schema, form_instance(schema, fields))
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "file: required, the audio file (multipart/form-data)", param="file")
    data = await upload.read()
    model = await gateway.triton.model(form.get("model"), "transcription")
    request.state.model = model.name
    wanted = answer_wanted(form, task)
    inputs = audio_inputs(form, data, wanted)
    if wanted.streamed:
        return await transcript_events(gateway, model.ensembles["speech_stream"], inputs, audio_tokens(data))
    ensemble = model.ensembles["speech"]
    speaker_fields = [
        key for key in form if key.removesuffix("[]") in ("known_speaker_names", "known_speaker_references")
    ]
    if speaker_fields and not wanted.diarized:
        raise ApiError(400, f"{speaker_fields[0]}: needs response_format diarized_json", param=speaker_fields[0])
    if wanted.diarized:
        if "speech_diarized" not in model.ensembles:
            raise ApiError(
                400,
                f"response_format: model {model.name!r} was built without speakers; rebuild it with "
                "`tritonkit build whisper --diarize resemblyzer` for diarized_json",
                param="response_format",
            )
        ensemble = model.ensembles["speech_diarized"]
        inputs |= speaker_inputs(form)
    outputs = await gateway.triton.infer(ensemble, inputs, "file")
    return answer(outputs, data, wanted)


def answer_wanted(form: FormData, task: str) -> AudioAnswer:
    streamed = str(form.get("stream") or "").lower() in ("true", "1")
    if streamed and task != "transcribe":
        raise ApiError(400, "stream: translations are answered whole; leave stream out", param="stream")
    response_format = str(form.get("response_format") or "json")
    if response_format not in AUDIO_FORMATS:
        raise ApiError(400, f"response_format: one of {', '.join(AUDIO_FORMATS)}", param="response_format")
    if streamed and response_format not in ("json", "text"):
        raise ApiError(400, "stream: with response_format json or text", param="stream")
    if response_format == "diarized_json" and task != "transcribe":
        raise ApiError(400, "response_format: diarized_json is for transcriptions", param="response_format")
    granularities = tuple(
        str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    )
    unknown = sorted(set(granularities) - {"segment", "word"})
    if unknown:
        raise ApiError(
            400, f"timestamp_granularities: segment or word, got {unknown[0]!r}", param="timestamp_granularities"
        )
    if granularities and response_format != "verbose_json":  # as OpenAI answers
        raise ApiError(
            400, "timestamp_granularities: needs response_format verbose_json", param="timestamp_granularities"
        )
    return AudioAnswer(task, response_format, granularities, streamed)


def flag(raw: str) -> bool | None:
    if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError(raw)
    return True if raw.lower() in ("true", "1") else None


# beyond OpenAI's audio API: a seed as chat's, faster-whisper's beam_size, speaches' vad_filter
FORM_OPTIONS: tuple[tuple[str, str, Callable, str], ...] = (  # field, input, its value from text, what it must be
    ("prompt", c.PROMPT, str, "text"),
    ("seed", c.SEED, int, "an integer"),
    ("beam_size", c.BEAM_SIZE, int, "an integer from 1 to 5"),
    ("vad_filter", c.VAD_FILTER, flag, "true or false"),
)


def audio_inputs(form: FormData, data: bytes, wanted: AudioAnswer) -> dict[str, np.ndarray]:
    """The transcription ensemble's inputs for the form."""
    language = form.get("language")
    chosen: dict[str, object] = {
        c.TASK: wanted.task,
        c.LANGUAGE: language if isinstance(language, str) and language else None,
    }
    for field, tensor, convert, expected in FORM_OPTIONS:
        raw = form.get(field)
        if not isinstance(raw, str) or not raw.strip():
            continue
        try:
            chosen[tensor] = convert(raw)  # a flag's false: None, left out
        except ValueError:
            raise ApiError(400, f"{field}: {expected}", param=field) from None
    raw_temperature = form.get("temperature")
    try:
        temperature = float(raw_temperature) if isinstance(raw_temperature, str) and raw_temperature else 0.0
    except ValueError:
        raise ApiError(400, "temperature: a number between 0 and 1", param="temperature") from None
    # OpenAI: 0 raises the temperature as its thresholds ask; above 0 samples
    chosen |= {c.TEMPERATURE: temperature, c.FALLBACK: temperature == 0.0}
    chosen |= {c.TIMESTAMPS: wanted.timed or None, c.WORD_TIMESTAMPS: wanted.words or None}
    rows = {name: c.request_row(name, value) for name, value in chosen.items() if value is not None}
    return {c.AUDIO: byte_row(data), **rows}


def speaker_inputs(form: FormData) -> dict[str, np.ndarray]:
    """NAME_diarize's inputs from OpenAI's fields: known_speaker_names[] with
    known_speaker_references[] (data URLs of clips), chunking_strategy ("auto" or a server_vad
    object: the speech that is diarized)."""
    names = [str(n) for n in form.getlist("known_speaker_names[]") + form.getlist("known_speaker_names")]
    urls = [str(u) for u in form.getlist("known_speaker_references[]") + form.getlist("known_speaker_references")]
    if len(names) != len(urls):
        raise ApiError(
            400,
            f"known_speaker_names: {len(names)} names for {len(urls)} known_speaker_references; give one clip per name",
            param="known_speaker_names",
        )
    chosen: dict[str, np.ndarray] = {}
    if names:
        clips = [data_url_bytes(url, f"known_speaker_references[{k}]") for k, url in enumerate(urls)]
        chosen[c.KNOWN_SPEAKER_NAMES] = c.request_row(c.KNOWN_SPEAKER_NAMES, names)
        chosen[c.KNOWN_SPEAKER_REFERENCES] = c.request_row(c.KNOWN_SPEAKER_REFERENCES, clips)
    strategy = form.get("chunking_strategy")
    nested = {
        key[len("chunking_strategy[") : -1]: value
        for key, value in form.multi_items()
        if key.startswith("chunking_strategy[")
    }
    if nested:
        fields = {k: v if k == "type" else number_or_text(str(v)) for k, v in nested.items()}
        chosen[c.CHUNKING] = c.request_row(c.CHUNKING, json.dumps(fields))
    elif isinstance(strategy, str) and strategy:
        chosen[c.CHUNKING] = c.request_row(c.CHUNKING, strategy)
    return chosen


def number_or_text(raw: str) -> object:
    """A form field's number as a number (the model checks what it must be)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def answer(outputs: Mapping[str, np.ndarray], data: bytes, wanted: AudioAnswer):
    text = first_text(outputs)
    if wanted.response_format == "text":
        return PlainTextResponse(text)
    if not wanted.timed:
        return {"text": text}
    found = segments_of(outputs)
    if wanted.diarized:  # OpenAI's CreateTranscriptionResponseDiarizedJson
        duration = subtitles.duration(data)
        segments = [
            {
                "type": "transcript.text.segment",
                "id": f"seg_{k:03d}",
                "start": seg["start"],
                "end": seg["end"],
                "text": seg["text"].strip(),
                "speaker": seg["speaker"],
            }
            for k, seg in enumerate(found)
        ]
        usage = {"type": "duration", "seconds": math.ceil(duration)}
        return {"task": "transcribe", "duration": duration, "text": text, "segments": segments, "usage": usage}
    if wanted.response_format == "srt":
        return PlainTextResponse(subtitles.srt(found))  # text/plain, as OpenAI answers srt and vtt
    if wanted.response_format == "vtt":
        return PlainTextResponse(subtitles.vtt(found))
    verbose = {
        "task": wanted.task,
        "language": subtitles.language_name(first_text(outputs, c.DECODED_LANGUAGE)),
        "duration": subtitles.duration(data),
        "text": text,
    }
    if wanted.words:  # OpenAI's words: trimmed text, times in seconds
        verbose["words"] = [
            {"word": w["word"].strip(), "start": w["start"], "end": w["end"]} for w in words_of(outputs)
        ]
        if "segment" not in wanted.granularities:
            return verbose
    return verbose | {"segments": [openai_segment(i, seg) for i, seg in enumerate(found)]}


def openai_segment(index: int, seg: dict) -> dict:
    return {
        "id": index,
        "seek": 0,
        "start": seg["start"],
        "end": seg["end"],
        "text": seg["text"],
        "tokens": [],
        "temperature": seg["temperature"],
        "avg_logprob": seg["avg_logprob"],
        "compression_ratio": seg["compression_ratio"],
        "no_speech_prob": seg["no_speech_prob"],
    }


async def transcript_events(gateway: Gateway, ensemble: str, inputs: dict, input_tokens: int) -> StreamingResponse:
    """OpenAI's streamed transcription: a transcript.text.delta event as each window's text is
    final, then transcript.text.done with the whole text and the token usage (input: the
    encoder's 1,500 audio tokens a 30 s window; output: the decoded tokens)."""
    stream = gateway.triton.stream(ensemble, inputs, "file")
    first = await anext_or_none(stream)  # errors before the first event are still a 400/429/503

    async def events():
        text, output_tokens, outputs = "", 0, first
        try:
            while outputs is not None:
                piece = first_text(outputs)
                output_tokens += int((outputs[c.TOKENS] >= 0).sum())
                if piece:
                    text += piece
                    yield server_sent_event({"type": "transcript.text.delta", "delta": piece})
                outputs = await anext_or_none(stream)
        except ApiError as exc:
            yield server_sent_event(exc.body())
            return
        usage = realtime.token_usage(input_tokens, output_tokens)
        yield server_sent_event({"type": "transcript.text.done", "text": text, "usage": usage})

    return StreamingResponse(events(), media_type="text/event-stream")


def audio_tokens(data: bytes) -> int:
    """The audio tokens of a file for OpenAI's `usage`: the encoder's positions of each 30 s window."""
    return AUDIO_TOKENS_PER_WINDOW * max(1, math.ceil(subtitles.duration(data) / 30))


def words_of(outputs: Mapping[str, np.ndarray]) -> list[dict]:
    """The timed words of one transcription's outputs (padding dropped): word (with its leading
    space), start, end, probability."""
    return [
        {
            "word": raw.decode("utf-8", errors="replace"),
            "start": round(float(start), 3),
            "end": round(float(end), 3),
            "probability": round(float(probability), 4),
        }
        for (start, end), raw, probability in zip(
            outputs[c.WORD_TIMES][0], outputs[c.WORD_TEXTS][0], outputs[c.WORD_PROBS][0]
        )
        if start >= 0
    ]


def segments_of(outputs: Mapping[str, np.ndarray]) -> list[dict]:
    """The segments of one transcription's outputs (padding rows dropped)."""
    found = []
    stats = outputs.get(c.SEGMENT_STATS)
    speakers = outputs.get(c.SEGMENT_SPEAKERS)
    for k, ((start, end), raw) in enumerate(zip(outputs[c.SEGMENT_TIMES][0], outputs[c.SEGMENT_TEXTS][0])):
        if start < 0:
            continue
        figures = stats[0, k] if stats is not None else np.zeros(4)
        found.append(
            {
                "start": round(float(start), 3),
                "end": round(float(end), 3),
                "text": raw.decode("utf-8", errors="replace"),
                "avg_logprob": float(figures[0]),
                "compression_ratio": float(figures[1]),
                "no_speech_prob": float(figures[2]),
                "temperature": float(figures[3]),
            }
            | ({"speaker": speakers[0, k].decode("utf-8", errors="replace")} if speakers is not None else {})
        )
    return found
