"""The contracts a tritonkit repository serves: embeddings (of images and texts, or of voices),
transcription and chat.

A contract is what a client may rely on whatever family built the repository: the tensors its
ensembles take and give (name, dtype, shape per request row, which inputs may be left out) and the
ensemble names that offer it. Families declare their ensembles' public tensors from here, the
gateway finds a repository's models by these rules, and the client and tests build their requests
with `request_row`, so each tensor is written down once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tritonkit.dtypes import numpy_dtype
from tritonkit.triton_config import Tensor

# Embeddings: an image or a text in, one vector out (its length is the model's).
IMAGE, TEXT = "IMAGE", "TEXT"
IMAGE_EMBEDS, TEXT_EMBEDS = "IMAGE_EMBEDS", "TEXT_EMBEDS"
AUDIO_EMBEDS = "AUDIO_EMBEDS"  # a speaker embedding of an audio file (AUDIO in)
# Transcription: an audio file in, its text, tokens and language out; segments and words when asked.
AUDIO = "AUDIO"
LANGUAGE, TASK, MAX_NEW_TOKENS = "LANGUAGE", "TASK", "MAX_NEW_TOKENS"
TIMESTAMPS = "TIMESTAMPS"  # decode timestamps and answer segments
PROMPT = "PROMPT"  # Whisper: text that conditions the transcript; chat: the user's one turn
TEMPERATURE, SEED = "TEMPERATURE", "SEED"
FALLBACK = "FALLBACK"  # OpenAI's temperature fallback and no-speech skip
BEAM_SIZE, LENGTH_PENALTY, PATIENCE = "BEAM_SIZE", "LENGTH_PENALTY", "PATIENCE"
CONDITION_ON_PREVIOUS = "CONDITION_ON_PREVIOUS"  # long-form: condition windows on the text before
VAD_FILTER = "VAD_FILTER"  # decode only the speech Silero VAD finds (faster-whisper's vad_filter)
WORD_TIMESTAMPS = "WORD_TIMESTAMPS"  # time each word (openai-whisper's alignment)
TOKENS, DECODED_LANGUAGE = "TOKENS", "DECODED_LANGUAGE"  # the language given, or detected in the first window
SEGMENT_TIMES, SEGMENT_TEXTS = "SEGMENT_TIMES", "SEGMENT_TEXTS"  # [segments, 2] seconds, [segments]
SEGMENT_STATS = "SEGMENT_STATS"  # per segment: avg_logprob, compression_ratio, no_speech_prob, temperature
WORD_TIMES, WORD_TEXTS, WORD_PROBS = "WORD_TIMES", "WORD_TEXTS", "WORD_PROBS"  # word text with its leading space
# Who spoke when (NAME_diarize): the speaker count or its bounds, known speakers' names and clips,
# OpenAI's chunking_strategy ("auto" or server_vad JSON); a speaker per segment and per word, the turns
NUM_SPEAKERS, MIN_SPEAKERS, MAX_SPEAKERS = "NUM_SPEAKERS", "MIN_SPEAKERS", "MAX_SPEAKERS"
KNOWN_SPEAKER_NAMES, KNOWN_SPEAKER_REFERENCES = "KNOWN_SPEAKER_NAMES", "KNOWN_SPEAKER_REFERENCES"
CHUNKING = "CHUNKING"
SEGMENT_SPEAKERS, WORD_SPEAKERS = "SEGMENT_SPEAKERS", "WORD_SPEAKERS"  # "" for padding rows
TURN_TIMES, TURN_SPEAKERS = "TURN_TIMES", "TURN_SPEAKERS"  # [turns, 2] seconds, [turns]
# Chat: a conversation (and its images) in, the answer out, whole or streamed.
IMAGES = "IMAGES"  # several encoded images (Qwen-VL), instead of IMAGE
MESSAGES = "MESSAGES"  # instead of PROMPT: a JSON conversation with one {"type": "image"} part per image
TOP_P, STOP = "TOP_P", "STOP"
TOP_LOGPROBS, RESPONSE_FORMAT = "TOP_LOGPROBS", "RESPONSE_FORMAT"  # OpenAI's logprobs, structured outputs
PROMPT_TOKENS, COMPLETION_TOKENS = "PROMPT_TOKENS", "COMPLETION_TOKENS"
FINISH_REASON, LOGPROBS = "FINISH_REASON", "LOGPROBS"  # OpenAI's finish_reason; logprobs as OpenAI's JSON


def _option(name: str, dtype: str, dims: tuple[int, ...] = (1,), ragged: bool = False) -> Tensor:
    return Tensor(name, dtype, dims, ragged=ragged, optional=True)


# Every public tensor once; -1 where the model decides (a family narrows it with `Contract.tensor`).
TENSORS: dict[str, Tensor] = {
    t.name: t
    for t in (
        Tensor(IMAGE, "uint8", (-1,), ragged=True),
        Tensor(TEXT, "string", (1,)),
        Tensor(IMAGE_EMBEDS, "float32", (-1,)),
        Tensor(TEXT_EMBEDS, "float32", (-1,)),
        Tensor(AUDIO, "uint8", (-1,), ragged=True),
        Tensor(AUDIO_EMBEDS, "float32", (-1,)),
        _option(LANGUAGE, "string"),
        _option(TASK, "string"),
        _option(MAX_NEW_TOKENS, "int32"),
        _option(TIMESTAMPS, "bool"),
        _option(PROMPT, "string"),
        _option(TEMPERATURE, "float32"),
        _option(FALLBACK, "bool"),
        _option(SEED, "int64"),
        _option(VAD_FILTER, "bool"),
        _option(BEAM_SIZE, "int32"),
        _option(LENGTH_PENALTY, "float32"),
        _option(PATIENCE, "float32"),
        _option(CONDITION_ON_PREVIOUS, "bool"),
        _option(WORD_TIMESTAMPS, "bool"),
        Tensor(TOKENS, "int64", (-1,)),
        Tensor(DECODED_LANGUAGE, "string", (1,)),
        Tensor(SEGMENT_TIMES, "float32", (-1, 2)),
        Tensor(SEGMENT_TEXTS, "string", (-1,)),
        Tensor(SEGMENT_STATS, "float32", (-1, 4)),
        Tensor(WORD_TIMES, "float32", (-1, 2)),
        Tensor(WORD_TEXTS, "string", (-1,)),
        Tensor(WORD_PROBS, "float32", (-1,)),
        _option(NUM_SPEAKERS, "int32"),
        _option(MIN_SPEAKERS, "int32"),
        _option(MAX_SPEAKERS, "int32"),
        _option(KNOWN_SPEAKER_NAMES, "string", (-1,), ragged=True),
        _option(KNOWN_SPEAKER_REFERENCES, "string", (-1,), ragged=True),  # encoded audio files
        _option(CHUNKING, "string"),
        Tensor(SEGMENT_SPEAKERS, "string", (-1,)),
        Tensor(WORD_SPEAKERS, "string", (-1,)),
        Tensor(TURN_TIMES, "float32", (-1, 2)),
        Tensor(TURN_SPEAKERS, "string", (-1,)),
        _option(IMAGES, "string", (-1,), ragged=True),
        _option(MESSAGES, "string"),
        _option(TOP_P, "float32"),
        _option(STOP, "string", (-1,), ragged=True),
        _option(TOP_LOGPROBS, "int32"),
        _option(RESPONSE_FORMAT, "string"),
        Tensor(PROMPT_TOKENS, "int32", (1,)),
        Tensor(COMPLETION_TOKENS, "int32", (1,)),
        Tensor(FINISH_REASON, "string", (1,)),
        Tensor(LOGPROBS, "string", (1,)),
    )
}


@dataclass(frozen=True)
class Role:
    """One ensemble a served model answers with: its name is the model's name plus `suffix`, and
    its inputs and outputs tell it apart from the other roles."""

    name: str  # image, text (embeddings); speech, speech_stream; chat, stream, text, text_stream
    suffix: str
    needs: frozenset[str] = frozenset()  # inputs it must take
    refuses: frozenset[str] = frozenset()  # inputs it must not take
    gives: frozenset[str] = frozenset()  # outputs it must give
    only: bool = False  # `needs` are all its inputs
    beside: str | None = None  # the role an ensemble of the model's bare name must play beside it
    companion: tuple[str, str] | None = None  # (ServedModel field, name suffix) of a model next to it

    def plays(self, ensemble: str, inputs: set[str], outputs: set[str], ensembles: Mapping[str, object]) -> str | None:
        """The served model's name if `ensemble` plays this role, else None."""
        if not ensemble.endswith(self.suffix) or (self.suffix and ensemble == self.suffix):
            return None
        if not self.needs <= inputs or self.refuses & inputs or not self.gives <= outputs:
            return None
        if self.only and inputs != self.needs:
            return None
        name = ensemble[: len(ensemble) - len(self.suffix)]
        if self.beside is not None and name not in ensembles:
            return None
        return name


@dataclass(frozen=True)
class Contract:
    kind: str  # embeddings, transcription, chat: OpenAI's endpoint group and ServedModel.kind
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    roles: tuple[Role, ...] = field(default=())

    def tensor(self, name: str, **changes) -> Tensor:
        """The contract's tensor `name`, narrowed by a family (its dims, whether it is optional)."""
        if name not in self.inputs + self.outputs:
            raise KeyError(f"{name} is not a tensor of the {self.kind} contract")
        return dataclasses.replace(TENSORS[name], **changes)

    def tensors(
        self,
        dims: Mapping[str, tuple[int, ...]] | None = None,
        optional: Iterable[str] = (),
        without: Iterable[str] = (),
    ) -> dict[str, Tensor]:
        """Every public tensor of the contract by name, as a family narrows them: the dims its
        model fixes, the inputs it lets requests leave out, the ones it does not take."""
        fixed, loose, left_out = dims or {}, set(optional), set(without)
        return {
            name: self.tensor(
                name, dims=fixed.get(name, TENSORS[name].dims), optional=name in loose or TENSORS[name].optional
            )
            for name in self.inputs + self.outputs
            if name not in left_out
        }


EMBEDDINGS = Contract(
    "embeddings",
    inputs=(IMAGE, TEXT),
    outputs=(IMAGE_EMBEDS, TEXT_EMBEDS),
    roles=(
        Role("image", "_image", needs=frozenset({IMAGE}), gives=frozenset({IMAGE_EMBEDS}), only=True),
        Role(
            "text",
            "_text",
            needs=frozenset({TEXT}),
            gives=frozenset({TEXT_EMBEDS}),
            only=True,
            companion=("tokenizer", "_tokenizer"),
        ),
    ),
)
TRANSCRIPTION = Contract(
    "transcription",
    inputs=(
        AUDIO,
        LANGUAGE,
        TASK,
        MAX_NEW_TOKENS,
        TIMESTAMPS,
        PROMPT,
        TEMPERATURE,
        FALLBACK,
        SEED,
        VAD_FILTER,
        BEAM_SIZE,
        LENGTH_PENALTY,
        PATIENCE,
        CONDITION_ON_PREVIOUS,
        WORD_TIMESTAMPS,
        NUM_SPEAKERS,
        MIN_SPEAKERS,
        MAX_SPEAKERS,
        KNOWN_SPEAKER_NAMES,
        KNOWN_SPEAKER_REFERENCES,
        CHUNKING,
    ),
    outputs=(
        TEXT,
        TOKENS,
        DECODED_LANGUAGE,
        SEGMENT_TIMES,
        SEGMENT_TEXTS,
        SEGMENT_STATS,
        WORD_TIMES,
        WORD_TEXTS,
        WORD_PROBS,
        SEGMENT_SPEAKERS,
        WORD_SPEAKERS,
        TURN_TIMES,
        TURN_SPEAKERS,
    ),
    roles=(
        # NAME_stream beside NAME: the transcript window by window
        Role("speech_stream", "_stream", needs=frozenset({AUDIO}), gives=frozenset({TEXT}), beside="speech"),
        # NAME_diarize beside NAME: the transcript with who spoke when (a build with --diarize)
        Role(
            "speech_diarized",
            "_diarize",
            needs=frozenset({AUDIO}),
            gives=frozenset({SEGMENT_SPEAKERS}),
            beside="speech",
        ),
        Role("speech", "", needs=frozenset({AUDIO}), gives=frozenset({TEXT}), companion=("vad", "_vad")),
    ),
)
_TURN = frozenset({PROMPT})
CHAT = Contract(
    "chat",
    inputs=(
        IMAGE,
        IMAGES,
        PROMPT,
        MESSAGES,
        MAX_NEW_TOKENS,
        TEMPERATURE,
        TOP_P,
        SEED,
        STOP,
        TOP_LOGPROBS,
        RESPONSE_FORMAT,
    ),
    outputs=(TEXT, PROMPT_TOKENS, COMPLETION_TOKENS, FINISH_REASON, LOGPROBS),
    roles=(
        # turns without images skip the vision stages: NAME_chat_text(_stream)
        Role("text_stream", "_chat_text_stream", needs=_TURN, refuses=frozenset({IMAGE}), gives=frozenset({TEXT})),
        Role("text", "_chat_text", needs=_TURN, refuses=frozenset({IMAGE}), gives=frozenset({TEXT})),
        Role("stream", "_chat_stream", needs=_TURN | {IMAGE}, gives=frozenset({TEXT})),
        Role("chat", "_chat", needs=_TURN | {IMAGE}, gives=frozenset({TEXT})),
    ),
)
# Who is speaking: an audio file in, its speaker's embedding out (OpenAI's embeddings endpoint).
SPEAKER_EMBEDDINGS = Contract(
    "embeddings",
    inputs=(AUDIO,),
    outputs=(AUDIO_EMBEDS,),
    roles=(Role("audio", "_audio", needs=frozenset({AUDIO}), gives=frozenset({AUDIO_EMBEDS}), only=True),),
)
CONTRACTS = (EMBEDDINGS, SPEAKER_EMBEDDINGS, TRANSCRIPTION, CHAT)


def request_row(name: str, value: object) -> np.ndarray:
    """One request's value of the public input `name` as the [1, ...] array it is sent as, in the
    contract's dtype: a string encoded, a list of strings (STOP, IMAGES) as one row, a mapping
    (RESPONSE_FORMAT) as its JSON."""
    tensor = TENSORS[name]
    if tensor.dtype == "string":
        values = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
        encoded = [json.dumps(dict(v)) if isinstance(v, Mapping) else v for v in values]
        return np.array([[v.encode() if isinstance(v, str) else v for v in encoded]], dtype=object)
    return np.array([[value]], dtype=numpy_dtype(tensor.triton_type))
