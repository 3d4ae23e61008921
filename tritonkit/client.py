"""A small gRPC client for tritonkit's ensembles (tritonclient underneath)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from tritonkit import contracts as c
from tritonkit.dtypes import wire_datatype
from tritonkit.errors import InferenceError, InputError, TritonkitError


def pack_byte_rows(items: Sequence[bytes]) -> np.ndarray:
    """Encoded files -> UINT8 [B, max_len], each row zero-padded at the end."""
    if not items:
        raise InputError("no inputs given")
    width = max(len(b) for b in items)
    rows = np.zeros((len(items), max(width, 1)), dtype=np.uint8)
    for i, data in enumerate(items):
        rows[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
    return rows


def read_inputs(items: Iterable[bytes | str | Path]) -> list[bytes]:
    out = []
    for item in items:
        if isinstance(item, bytes):
            out.append(item)
            continue
        path = Path(item)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        out.append(path.read_bytes())
    return out


@dataclass(frozen=True)
class Segment:
    start: float  # seconds on the file's timeline
    end: float
    text: str
    # OpenAI's per-window figures (shared by a window's segments)
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    speaker: str = ""  # NAME_diarize: who spoke it


@dataclass(frozen=True)
class TimedWord:
    word: str  # with its leading space, as Whisper's tokens spell it
    start: float  # seconds on the file's timeline
    end: float
    probability: float
    speaker: str = ""  # NAME_diarize: who spoke it


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # the language asked for, or the one detected in the first 30 s window
    tokens: tuple[int, ...]
    segments: tuple[Segment, ...] = ()  # with timestamps=True
    words: tuple[TimedWord, ...] = ()  # with word_timestamps=True
    turns: tuple[tuple[float, float, str], ...] = ()  # NAME_diarize: (start, end, speaker), who spoke when

    def __str__(self) -> str:
        return self.text


def option_tensor(spec: Mapping, value: str) -> np.ndarray:
    """A command-line value as a one-row tensor of the input `spec` (model config JSON): a file's
    bytes for UINT8, text for STRING, numbers and true/false otherwise."""
    name, dtype = spec["name"], spec["data_type"]
    try:
        if dtype == "TYPE_UINT8":
            (data,) = read_inputs([value])
            return pack_byte_rows([data])
        if dtype == "TYPE_STRING":
            return np.array([[value.encode()]], dtype=object)
        if dtype == "TYPE_BOOL":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return np.array([[value.lower() in ("true", "1", "yes")]], dtype=bool)
        if dtype in ("TYPE_INT32", "TYPE_INT64"):
            return np.array([[int(value)]], dtype=np.int32 if dtype == "TYPE_INT32" else np.int64)
        if dtype in ("TYPE_FP32", "TYPE_FP16"):
            return np.array([[float(value)]], dtype=np.float32 if dtype == "TYPE_FP32" else np.float16)
    except ValueError:
        raise InputError(f"{name}: {value!r} is not a {dtype.removeprefix('TYPE_').lower()} value") from None
    raise InputError(f"{name}: infer cannot send {dtype} inputs")


@dataclass(frozen=True)
class WhisperOptions:
    """The Whisper ensemble's optional inputs (README contract); None leaves one out."""

    language: str | None = None
    task: str | None = None
    max_new_tokens: int | None = None
    timestamps: bool | None = None
    prompt: str | None = None
    temperature: float | None = None
    fallback: bool | None = None
    seed: int | None = None
    vad: bool | None = None
    beam_size: int | None = None
    length_penalty: float | None = None
    patience: float | None = None
    condition_on_previous: bool | None = None
    word_timestamps: bool | None = None
    # NAME_diarize only: the speaker count or its bounds, known speakers' names and clips, the
    # speech detection (OpenAI's chunking_strategy: "auto" or server_vad JSON)
    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None
    known_speaker_names: tuple[str, ...] | None = None
    known_speaker_references: tuple[bytes, ...] | None = None
    chunking: str | None = None

    TENSORS: ClassVar[dict[str, str]] = {  # field -> the transcription contract's input
        "language": c.LANGUAGE,
        "task": c.TASK,
        "max_new_tokens": c.MAX_NEW_TOKENS,
        "timestamps": c.TIMESTAMPS,
        "prompt": c.PROMPT,
        "temperature": c.TEMPERATURE,
        "fallback": c.FALLBACK,
        "seed": c.SEED,
        "vad": c.VAD_FILTER,
        "beam_size": c.BEAM_SIZE,
        "length_penalty": c.LENGTH_PENALTY,
        "patience": c.PATIENCE,
        "condition_on_previous": c.CONDITION_ON_PREVIOUS,
        "word_timestamps": c.WORD_TIMESTAMPS,
        "num_speakers": c.NUM_SPEAKERS,
        "min_speakers": c.MIN_SPEAKERS,
        "max_speakers": c.MAX_SPEAKERS,
        "known_speaker_names": c.KNOWN_SPEAKER_NAMES,
        "known_speaker_references": c.KNOWN_SPEAKER_REFERENCES,
        "chunking": c.CHUNKING,
    }

    def tensors(self) -> dict[str, np.ndarray]:
        chosen = {name: getattr(self, field_name) for field_name, name in self.TENSORS.items()}
        return {name: c.request_row(name, value) for name, value in chosen.items() if value is not None}


def whisper_inputs(data: bytes, **options) -> dict[str, np.ndarray]:
    """One audio file and its options (WhisperOptions' fields) as the Whisper ensemble's inputs."""
    try:
        chosen = WhisperOptions(**options)
    except TypeError:
        unknown = sorted(set(options) - set(WhisperOptions.TENSORS))
        raise InputError(
            f"{', '.join(unknown)}: not a Whisper option (they are {', '.join(WhisperOptions.TENSORS)})"
        ) from None
    return {c.AUDIO: pack_byte_rows([data]), **chosen.tensors()}


def transcript(result: dict[str, np.ndarray], row: int = 0) -> Transcript:
    """One row of the Whisper ensemble's outputs as a Transcript."""

    def speakers(name: str, count: int) -> list[str]:
        named = result.get(name)
        return [s.decode("utf-8") for s in named[row]] if named is not None else [""] * count

    found = []
    if c.SEGMENT_TIMES in result:
        stats = result.get(c.SEGMENT_STATS)
        times = result[c.SEGMENT_TIMES][row]
        for k, ((start, end), text, speaker) in enumerate(
            zip(times, result[c.SEGMENT_TEXTS][row], speakers(c.SEGMENT_SPEAKERS, len(times)))
        ):
            if start >= 0:
                logprob, ratio, no_speech, temperature = (
                    (float(v) for v in stats[row, k]) if stats is not None else (0.0,) * 4
                )
                found.append(
                    Segment(
                        float(start), float(end), text.decode("utf-8"), logprob, ratio, no_speech, temperature, speaker
                    )
                )
    words = []
    if c.WORD_TIMES in result:
        times = result[c.WORD_TIMES][row]
        for (start, end), text, probability, speaker in zip(
            times, result[c.WORD_TEXTS][row], result[c.WORD_PROBS][row], speakers(c.WORD_SPEAKERS, len(times))
        ):
            if start >= 0:
                words.append(TimedWord(text.decode("utf-8"), float(start), float(end), float(probability), speaker))
    turns = []
    if c.TURN_TIMES in result:
        for (start, end), speaker in zip(result[c.TURN_TIMES][row], result[c.TURN_SPEAKERS][row]):
            if start >= 0:
                turns.append((float(start), float(end), speaker.decode("utf-8")))
    return Transcript(
        text=result[c.TEXT][row, 0].decode("utf-8"),
        language=result[c.DECODED_LANGUAGE][row, 0].decode(),
        tokens=tuple(int(t) for t in result[c.TOKENS][row] if t >= 0),
        segments=tuple(found),
        words=tuple(words),
        turns=tuple(turns),
    )


def chat_inputs(
    image: bytes | Sequence[bytes] | None,
    prompt: str | Sequence[Mapping],
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    top_logprobs: int | None = None,
    response_format: Mapping | None = None,
) -> dict[str, np.ndarray]:
    """An image (or a list of them: IMAGES, for Qwen-VL), a prompt (or a conversation: messages
    with one {"type": "image"} part per image, sent as MESSAGES) and its options as the chat
    ensembles' inputs (None left out)."""
    inputs: dict[str, np.ndarray] = {}
    if isinstance(image, bytes):
        inputs[c.IMAGE] = pack_byte_rows([image])
    elif image is not None:  # None: a turn without an image
        inputs[c.IMAGES] = c.request_row(c.IMAGES, list(image))
    if isinstance(prompt, str):
        inputs[c.PROMPT] = c.request_row(c.PROMPT, prompt)
    else:
        inputs[c.MESSAGES] = c.request_row(c.MESSAGES, json.dumps(list(prompt)))
    options = {
        c.MAX_NEW_TOKENS: max_new_tokens,
        c.TEMPERATURE: temperature,
        c.TOP_P: top_p,
        c.SEED: seed,
        c.STOP: list(stop) or None,
        c.TOP_LOGPROBS: top_logprobs,
        # OpenAI's object: {"type": "json_schema", "json_schema": {"name", "schema"}}
        c.RESPONSE_FORMAT: json.dumps(dict(response_format)) if response_format is not None else None,
    }
    inputs.update({name: c.request_row(name, value) for name, value in options.items() if value is not None})
    return inputs


class TritonkitClient:
    def __init__(self, url: str = "127.0.0.1:8001", timeout_s: float | None = 120):
        import tritonclient.grpc as grpcclient

        self.url = url
        self.timeout_s = timeout_s
        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self._model_io: dict[str, tuple[list[dict], list[dict], int]] = {}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonkitClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_io(self, model: str) -> tuple[list[dict], list[dict], int]:
        """Inputs, outputs and max batch size of `model`, asked of the server once per model."""
        if model not in self._model_io:
            try:
                config = self.client.get_model_config(model, as_json=True)["config"]
            except Exception as exc:
                raise InferenceError(f"model {model!r} is not available at {self.url}: {_message(exc)}") from None
            self._model_io[model] = (config["input"], config["output"], int(config.get("max_batch_size", 0)))
        return self._model_io[model]

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request; arrays carry their batch dimension."""
        tensors = []
        for name, array in inputs.items():
            tensor = self._grpc.InferInput(name, list(array.shape), wire_datatype(array))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        _, model_outputs, _ = self.model_io(model)
        outputs = [self._grpc.InferRequestedOutput(o["name"]) for o in model_outputs]
        try:
            result = self.client.infer(model, tensors, outputs=outputs, client_timeout=self.timeout_s)
        except Exception as exc:
            raise InferenceError(f"{model}: {_message(exc)}") from None
        return {o["name"]: result.as_numpy(o["name"]) for o in model_outputs}

    def _batched(self, model: str, rows: list, make_input) -> np.ndarray:
        inputs, outputs, max_batch = self.model_io(model)
        (input_name,), (output_name,) = [i["name"] for i in inputs], [o["name"] for o in outputs]
        step = max_batch or 1
        parts = [
            self.infer(model, {input_name: make_input(rows[i : i + step])})[output_name]
            for i in range(0, len(rows), step)
        ]
        return np.concatenate(parts, axis=0)

    def infer_each(
        self, model: str, items: Sequence[str], options: Mapping[str, str] | None = None, concurrency: int = 4
    ) -> list[dict[str, np.ndarray] | TritonkitError]:
        """One request per item (a file for a byte input, else text) to `model`'s one required input,
        with `options` (input name -> value as text) for the others; per item its outputs or its
        error, so a bad item fails alone."""
        from concurrent.futures import ThreadPoolExecutor

        inputs, _, _ = self.model_io(model)
        required = [i for i in inputs if not i.get("optional")]
        if len(required) != 1:
            raise InputError(
                f"{model}: takes {', '.join(i['name'] for i in required)}; "
                "infer fills one input from its arguments and the rest from --input NAME=VALUE"
            )
        (main,) = required
        by_name = {i["name"]: i for i in inputs}
        extra = {}
        for name, value in (options or {}).items():
            if name not in by_name:
                raise InputError(f"--input {name}: {model} has no such input (it takes {', '.join(by_name)})")
            extra[name] = option_tensor(by_name[name], value)

        def one(item: str) -> dict[str, np.ndarray] | TritonkitError:
            try:
                return self.infer(model, {main["name"]: option_tensor(main, item), **extra})
            except TritonkitError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, items))

    def embed_images(self, images: Iterable[bytes | str | Path], model: str = "clip_image") -> np.ndarray:
        """Encoded image files (paths or bytes) -> embeddings [N, D]."""
        return self._batched(model, read_inputs(images), pack_byte_rows)

    def embed_texts(self, texts: Sequence[str], model: str = "clip_text") -> np.ndarray:
        texts = list(texts)
        if not texts:
            raise InputError("no texts given")
        return self._batched(model, texts, lambda chunk: np.array([[t.encode()] for t in chunk], dtype=object))

    def transcribe(
        self,
        audio: Iterable[bytes | str | Path],
        model: str = "whisper",
        *,
        concurrency: int = 4,
        **options,
    ) -> list[Transcript]:
        """Audio files (paths or bytes) -> one transcript each, in order.

        Each file is its own request and up to `concurrency` are in flight, so the server's dynamic
        batcher, not the client, forms the batches. `options` are WhisperOptions' fields: `language`
        None lets a multilingual model detect it; `task` is "transcribe" (default) or "translate" (into English); `temperature` samples,
        `fallback` turns on OpenAI's temperature fallback, `seed` makes sampling reproducible; `vad`
        decodes only the speech Silero VAD finds (times stay on the file's timeline); `beam_size` > 1
        searches that many beams (at temperature 0). With timestamps, a file longer than 30 s is
        decoded with OpenAI's sequential long-form algorithm (`condition_on_previous`, default on,
        conditions each window on the text before it). `word_timestamps` times every word
        (`Transcript.words`, openai-whisper's alignment of the decoded text)."""
        from concurrent.futures import ThreadPoolExecutor

        whisper_inputs(b"", **options)  # an unknown option fails here, before any request

        def one(data: bytes) -> Transcript:
            return transcript(self.infer(model, whisper_inputs(data, **options)))

        files = read_inputs(audio)
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, files))

    def chat(
        self, image: ChatImages | None, prompt: str | Sequence[Mapping], model: str = "llava_chat", **options
    ) -> str:
        """The answer to `prompt` (or to a conversation) about `image` (or a list of images, for
        models that take several), whole (options: max_new_tokens, temperature, top_p, seed, stop)."""
        return self.chat_outputs(image, prompt, model, **options)[c.TEXT][0, 0].decode("utf-8")

    def chat_outputs(
        self,
        image: ChatImages | None,
        prompt: str | Sequence[Mapping],
        model: str = "llava_chat",
        choices: int = 1,
        **options,
    ) -> dict[str, np.ndarray]:
        """Every output of the whole answer (LOGPROBS with `top_logprobs`, the counts, the finish
        reason); `choices` > 1: that many answers, the rows of one request (seed + k each)."""
        images = chat_images(image)
        inputs = chat_inputs(images, prompt, **options)
        return self.infer(text_turn_ensemble(model, images), choice_rows(inputs, choices) if choices > 1 else inputs)

    def chat_stream(
        self, image: ChatImages | None, prompt: str | Sequence[Mapping], model: str = "llava_chat_stream", **options
    ):
        """Yield the answer's text piece by piece as the server generates it (gRPC streaming)."""
        images = chat_images(image)
        model = text_turn_ensemble(model, images)
        for result in self._stream(model, chat_inputs(images, prompt, **options)):
            piece = result.get(c.TEXT)
            if piece is not None and piece.size and piece.reshape(-1)[0]:
                yield piece.reshape(-1)[0].decode("utf-8")

    def transcribe_stream(self, audio: bytes | str | Path, model: str = "whisper_stream", **options):
        """Yield one file's transcript as it becomes final, window by window (a long file's first
        text after its first 30 s window): each piece a Transcript whose text is the new end of the
        text (the pieces join into the whole text) with the segments and words finished since the
        last piece. `options` as `transcribe`'s."""
        (data,) = read_inputs([audio])
        for result in self._stream(model, whisper_inputs(data, **options)):
            yield transcript(result)

    def _stream(self, model: str, inputs: Mapping[str, np.ndarray]):
        """The responses of one request to a decoupled model (gRPC streaming), each as its outputs
        by name, until the final one."""
        import queue

        _, declared, _ = self.model_io(model)  # an unknown model fails here with its name, not inside the stream
        tensors = []
        for name, array in inputs.items():
            tensors.append(self._grpc.InferInput(name, list(array.shape), wire_datatype(array)))
            tensors[-1].set_data_from_numpy(array)
        answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            self.client.async_stream_infer(model, tensors, enable_empty_final_response=True)
            while True:
                try:
                    result, error = answers.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise InferenceError(f"{model}: no answer within {self.timeout_s:g} s") from None
                if error is not None:
                    raise InferenceError(f"{model}: {_message(error)}")
                outputs = {o["name"]: result.as_numpy(o["name"]) for o in declared}
                outputs = {name: value for name, value in outputs.items() if value is not None}
                if outputs:  # the empty final response carries none
                    yield outputs
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        finally:
            self.client.stop_stream()

    def statistics(self, model: str) -> dict:
        return self.client.get_inference_statistics(model, as_json=True)


ChatImages = bytes | str | Path | Sequence[bytes | str | Path]


def choice_inputs(inputs: Mapping[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The inputs of choice `k` of a request (OpenAI's `n`): its own seed, seed + k, so that
    sampled choices differ and each is reproducible."""
    if k == 0 or c.SEED not in inputs:
        return dict(inputs)
    return {**inputs, c.SEED: inputs[c.SEED] + k}


def choice_rows(inputs: Mapping[str, np.ndarray], choices: int) -> dict[str, np.ndarray]:
    """One request whose rows are the choices, each row `choice_inputs`' of its choice."""
    each = [choice_inputs(inputs, k) for k in range(choices)]
    return {name: np.concatenate([choice[name] for choice in each]) for name in inputs}


def text_turn_ensemble(model: str, images: object) -> str:
    """The ensemble that answers a turn: NAME_chat(_stream) itself, or for a turn without images
    NAME_chat_text(_stream), which skips the vision stages."""
    if images is not None:
        return model
    for suffix, text_suffix in (("_chat_stream", "_chat_text_stream"), ("_chat", "_chat_text")):
        if model.endswith(suffix):
            return model[: -len(suffix)] + text_suffix
    return model


def chat_images(image: ChatImages | None) -> bytes | list[bytes] | None:
    """One image's bytes, or a list of images' (sent as IMAGES), or None (no image)."""
    if image is None:
        return None
    if isinstance(image, (bytes, str, Path)):
        (data,) = read_inputs([image])
        return data
    return read_inputs(list(image))


def _message(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def executed_batch_sizes(statistics: dict, model: str) -> dict[int, int]:
    """Batch size -> number of executions, from Triton's statistics of `model`."""
    for entry in statistics.get("model_stats", []):
        if entry["name"] == model:
            return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in entry.get("batch_stats", [])}
    return {}
