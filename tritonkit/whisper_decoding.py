"""Whisper's decoder as two export-friendly graphs, and the batched greedy loop that drives them.

`CrossKV` computes every layer's cross-attention keys/values once per window; `DecoderStep`
takes new tokens plus the self-attention cache and returns the last position's logits and the
grown cache. Every cache is one batch-first tensor per layer ([B, heads, length, head_dim]; cross
keys pre-transposed), so a step reads the caller's arrays in place. The decoder loop is generic
over the graphs' tensor names.

`WindowDecoder` decodes a whole dynamic batch together with the model's generation config
(suppress tokens, begin-suppress tokens, the no-timestamps prompt, language detection and the
task tokens of multilingual models). Finished rows leave the batch, so they stop costing work.
Greedy by default; a window with a TEMPERATURE samples from its own generator (seeded by SEED
and the window's place in its file, so a seeded request decodes alike alone or in any batch).
With FALLBACK, OpenAI's temperature fallback: a window whose text is too repetitive
(compression ratio > 2.4) or too unlikely (average log-probability < -1) is decoded again at the
next temperature (+0.2, up to 1.0) — only those windows, batched together — unless it is
probably silence (no-speech probability > 0.6), and a silent unlikely window is skipped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from tritonkit.batched_model import run_in_slices
from tritonkit.errors import InputError, shown

OFFSETS = "OFFSETS"  # the decoder step's input: each row's left padding in the shared cache


def layer_names(prefix: str, layers: int) -> list[str]:
    """One graph tensor per decoder layer (CROSS_KEYS_0 ...): ONNX Runtime reads each from the
    caller's buffer, where slicing one stacked tensor copied every layer's cache at every step."""
    return [f"{prefix}_{i}" for i in range(layers)]


def split_heads(x, heads: int):
    """[B, T, heads x head_dim] -> [B, heads, T, head_dim] (torch)."""
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


def merge_heads(x):
    """[B, heads, T, head_dim] -> [B, T, heads x head_dim] (torch)."""
    batch, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(batch, length, -1)


def _modules():
    import torch

    class CrossKV(torch.nn.Module):
        """ENCODER_HIDDEN -> each layer's cross-attention keys, transposed ([B, heads, head_dim,
        frames], ready for q @ k), then each layer's values ([B, heads, frames, head_dim])."""

        def __init__(self, model):
            super().__init__()
            self.layers = model.model.decoder.layers
            self.heads = model.config.decoder_attention_heads

        def forward(self, encoder_hidden):
            batch, length, _ = encoder_hidden.shape
            keys, values = [], []
            for layer in self.layers:
                attention = layer.encoder_attn
                k = attention.k_proj(encoder_hidden).view(batch, length, self.heads, -1).permute(0, 2, 3, 1)
                v = attention.v_proj(encoder_hidden).view(batch, length, self.heads, -1).transpose(1, 2)
                keys.append(k)
                values.append(v)
            return (*keys, *values)

    class DecoderStep(torch.nn.Module):
        """(INPUT_IDS, OFFSETS, past keys and values per layer, cross keys and values per layer) ->
        (the last position's logits, present keys and values per layer). The rows of INPUT_IDS and
        the self-attention cache are windows x beams (a window's beams together), the cross KV's
        rows are windows. OFFSETS ([rows, 1]) is each row's left padding: rows whose sequences
        began at different steps share one cache (the in-flight loop's), their padding masked."""

        def __init__(self, model):
            super().__init__()
            decoder = model.model.decoder
            self.decoder = decoder
            self.proj_out = model.proj_out
            self.heads = model.config.decoder_attention_heads
            self.layers = len(decoder.layers)
            self.embed_scale = float(getattr(decoder, "embed_scale", 1.0) or 1.0)

        @staticmethod
        def attend(q, k_transposed, v, mask):
            scores = torch.matmul(q, k_transposed) * (q.shape[-1] ** -0.5)
            if mask is not None:
                scores = scores + mask
            return torch.matmul(torch.softmax(scores, dim=-1), v)

        def attend_windows(self, q, k_transposed, v):
            """Cross attention where rows = windows x beams and the cross KV has a row per window:
            a window's beams are one query block against its keys, which are read once for them
            all (beam search would otherwise copy and read each window's cross KV once a beam)."""
            windows, heads, new, head_dim = k_transposed.shape[0], q.shape[1], q.shape[2], q.shape[3]
            grouped = q.reshape(windows, -1, heads, new, head_dim).transpose(1, 2).reshape(windows, heads, -1, head_dim)
            out = self.attend(grouped, k_transposed, v, None)
            return out.reshape(windows, heads, -1, new, head_dim).transpose(1, 2).reshape(-1, heads, new, head_dim)

        def split(self, x):
            return split_heads(x, self.heads)

        merge = staticmethod(merge_heads)

        def forward(self, input_ids, offsets, *caches):
            n = self.layers
            past_keys, past_values = caches[:n], caches[n : 2 * n]
            cross_keys, cross_values = caches[2 * n : 3 * n], caches[3 * n :]
            past = past_keys[0].shape[2]
            new = input_ids.shape[1]
            # row r is left-padded by offsets[r] columns: its token in column c is at position c - offset
            columns = torch.arange(new).unsqueeze(0) + past  # [1, new]
            positions = (columns - offsets).clamp(min=0)  # [rows, new]
            hidden = (
                self.decoder.embed_tokens(input_ids) * self.embed_scale + self.decoder.embed_positions.weight[positions]
            )
            # query i (column past + i) sees the columns from its row's first token up to its own
            # (and its own always: a padding query then attends to itself, never to nothing)
            key_columns = torch.arange(past + new).view(1, 1, -1)
            query_columns = columns.unsqueeze(-1)  # [1, new, 1]
            visible = (key_columns <= query_columns) & (
                (key_columns >= offsets.unsqueeze(-1)) | (key_columns == query_columns)
            )
            mask = torch.where(visible, 0.0, float("-inf")).to(hidden.dtype).unsqueeze(1)  # [rows, 1, new, keys]
            present_keys, present_values = [], []
            for i, layer in enumerate(self.decoder.layers):
                residual = hidden
                x = layer.self_attn_layer_norm(hidden)
                attention = layer.self_attn
                q = self.split(attention.q_proj(x))
                k = torch.cat([past_keys[i], self.split(attention.k_proj(x))], dim=2)
                v = torch.cat([past_values[i], self.split(attention.v_proj(x))], dim=2)
                present_keys.append(k)
                present_values.append(v)
                hidden = residual + attention.out_proj(self.merge(self.attend(q, k.transpose(-1, -2), v, mask)))
                residual = hidden
                x = layer.encoder_attn_layer_norm(hidden)
                cross = layer.encoder_attn
                q = self.split(cross.q_proj(x))
                hidden = residual + cross.out_proj(self.merge(self.attend_windows(q, cross_keys[i], cross_values[i])))
                residual = hidden
                x = layer.final_layer_norm(hidden)
                hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(x)))
            hidden = self.decoder.layer_norm(hidden[:, -1])
            return (self.proj_out(hidden), *present_keys, *present_values)

    return CrossKV, DecoderStep


def cross_kv_module(model):
    return _modules()[0](model).eval()


def decoder_step_module(model):
    return _modules()[1](model).eval()


@dataclass(frozen=True)
class DecodeSettings:
    """What greedy decoding needs from a model's generation config."""

    start_token: int
    end_token: int
    no_timestamps_token: int | None
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]
    max_length: int  # new tokens per window, as transformers counts it for Whisper
    max_target_positions: int = 448  # the decoder's positions: prompt + new tokens fit in them
    multilingual: bool = False
    language_tokens: dict[str, int] = field(default_factory=dict)  # "en" -> id
    task_tokens: dict[str, int] = field(default_factory=dict)  # "transcribe" / "translate" -> id
    language_names: dict[str, str] = field(default_factory=dict)  # "french" -> "fr"
    max_initial_timestamp_index: int | None = None  # the first timestamp is at most this many 0.02 s steps
    prev_sot_token: int | None = None  # <|startofprev|>: before the previous text a long-form window is conditioned on
    # the step graph's cross attention is per window: its rows are windows x beams, each window's
    # beams attending to one cross KV row (read once for all of them); older builds: a row per beam
    cross_kv_per_window: bool = False

    @property
    def timestamp_begin(self) -> int | None:
        """The id of <|0.00|>: timestamp tokens follow <|notimestamps|>."""
        return None if self.no_timestamps_token is None else self.no_timestamps_token + 1

    @classmethod
    def from_generation_config(cls, generation, max_target_positions: int = 448) -> DecodeSettings:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        languages = {}
        for token, token_id in (getattr(generation, "lang_to_id", None) or {}).items():
            languages[token.strip("<|>")] = int(token_id)
        return cls(
            start_token=int(generation.decoder_start_token_id),
            end_token=int(generation.eos_token_id),
            no_timestamps_token=getattr(generation, "no_timestamps_token_id", None),
            suppress_tokens=tuple(int(t) for t in (generation.suppress_tokens or [])),
            begin_suppress_tokens=tuple(int(t) for t in (generation.begin_suppress_tokens or [])),
            max_length=int(generation.max_length or max_target_positions),
            max_target_positions=int(max_target_positions),
            multilingual=bool(getattr(generation, "is_multilingual", False)),
            language_tokens=languages,
            task_tokens={k: int(v) for k, v in (getattr(generation, "task_to_id", None) or {}).items()},
            language_names={name: code for name, code in TO_LANGUAGE_CODE.items() if code in languages},
            max_initial_timestamp_index=getattr(generation, "max_initial_timestamp_index", None),
            prev_sot_token=getattr(generation, "prev_sot_token_id", None)
            or (int(generation.suppress_tokens[-2]) if len(generation.suppress_tokens or []) >= 2 else None),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecodeSettings:
        data = json.loads(text)
        data["suppress_tokens"] = tuple(data["suppress_tokens"])
        data["begin_suppress_tokens"] = tuple(data["begin_suppress_tokens"])
        return cls(**data)


TIME_PRECISION = 0.02  # seconds per timestamp token
FRAMES_PER_WINDOW = 3000  # 30 s of 10 ms mel frames
INPUT_STRIDE = 2  # mel frames per timestamp step
MAX_PROMPT_CHARS = 2000  # PROMPT text, checked before any work (its tokens are checked by the decoder)
# OpenAI's transcribe() defaults (also faster-whisper's and transformers' usual settings)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
TEMPERATURE_STEP = 0.2
MAX_TEMPERATURE = 1.0
MAX_BEAM_SIZE = 5


def temperature_schedule(temperature: float, fallback: bool) -> tuple[float, ...]:
    """The temperatures a window may be decoded at: OpenAI's (0.0, 0.2, ..., 1.0) from `temperature`."""
    if not fallback:
        return (temperature,)
    steps = int((MAX_TEMPERATURE - temperature) / TEMPERATURE_STEP + 1e-9)  # as np.arange(t, 1.0 + 1e-6, 0.2)
    return tuple(round(temperature + k * TEMPERATURE_STEP, 6) for k in range(steps + 1)) or (temperature,)


# The Whisper ensemble's optional inputs (README contract): the DecodeOptions field each sets and
# the type its values read as (str: UTF-8 text).
OPTION_INPUTS: dict[str, tuple[str, type]] = {
    "LANGUAGE": ("language", str),
    "TASK": ("task", str),
    "MAX_NEW_TOKENS": ("max_new_tokens", int),
    "TIMESTAMPS": ("timestamps", bool),
    "PROMPT": ("prompt", str),
    "TEMPERATURE": ("temperature", float),
    "FALLBACK": ("fallback", bool),
    "SEED": ("seed", int),
    "VAD_FILTER": ("vad", bool),
    "BEAM_SIZE": ("beam_size", int),
    "LENGTH_PENALTY": ("length_penalty", float),
    "PATIENCE": ("patience", float),
    "CONDITION_ON_PREVIOUS": ("condition", bool),
    "WORD_TIMESTAMPS": ("word_timestamps", bool),
}
SECONDS_PER_FRAME = 0.01  # one mel frame (hop of 160 samples at 16 kHz)


@dataclass(frozen=True)
class DecodeOptions:
    """Per-request options: language (None = detect), task, a cap on new tokens, and timestamps;
    and where the window sits in its file (set per window by the preprocessing)."""

    language: str | None = None
    task: str = "transcribe"
    max_new_tokens: int | None = None
    timestamps: bool = False  # decode timestamp tokens (Whisper's timestamp rules) and return segments
    prompt: str | None = None  # text before <|startoftranscript|>, after <|startofprev|> (OpenAI's initial_prompt)
    temperature: float = 0.0  # 0: greedy
    fallback: bool = False  # OpenAI's temperature fallback and no-speech skip
    seed: int | None = None  # sampling generator seed (None: random)
    beam_size: int = 1  # > 1: beam search at temperature 0 (transformers' algorithm)
    length_penalty: float = 1.0  # finished beams score sum(logprob) / length ** length_penalty
    patience: float = 1.0  # OpenAI's: wait for round(beam_size * patience) finished beams
    offset_s: float = 0.0  # the window's start in the original audio
    duration_s: float = 30.0  # the window's audio (before padding to 30 s)
    window: int = 0  # the window's index in its file (its sampling generator's second seed)
    vad: bool = False  # decode only the speech Silero VAD finds (faster-whisper's vad_filter)
    speech_ends: tuple[int, ...] = ()  # with vad: tritonkit.vad.SpeechMap, to put times back on the file
    speech_silences: tuple[float, ...] = ()
    empty: bool = False  # nothing to decode (VAD found no speech): no text, no segments
    long_form: bool = False  # OpenAI's sequential long-form decoding over the file's features
    total_frames: int = 0  # with long_form: the file's mel frames
    file_s: float = 0.0  # with long_form: the file's audio in seconds (segment times past it are clamped to it)
    first_window_encoded: bool = False  # long-form: the ensemble's encoder output is the first window's
    condition: bool = True  # long-form: condition each window on the text before it (condition_on_previous_text)
    previous: tuple[int, ...] | None = None  # long-form: the tokens a window is conditioned on
    word_timestamps: bool = False  # time each word (tritonkit.word_timing)

    def validate(self, settings: DecodeSettings) -> DecodeOptions:
        """The options with the language as a code ("French" -> "fr"); InputError if unusable."""
        task = (self.task or "transcribe").strip().lower()
        if task not in ("transcribe", "translate"):
            raise InputError(f"TASK: {shown(self.task)} is not one of transcribe, translate", reason="bad_option")
        language = (self.language or "").strip().lower() or None
        if language is not None:
            language = settings.language_names.get(language, language)
        if not settings.multilingual:
            if task == "translate":
                raise InputError(
                    "TASK: translate needs a multilingual model; this one is English-only", reason="bad_option"
                )
            if language not in (None, "en", "english"):
                raise InputError(
                    f"LANGUAGE: {shown(self.language)} is not available; this model is English-only",
                    reason="bad_option",
                )
            language = None
        elif language is not None and language not in settings.language_tokens:
            raise InputError(
                f"LANGUAGE: unknown language {shown(self.language)}; use a code such as en, fr, de or a name such as french",
                reason="bad_option",
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"MAX_NEW_TOKENS: must be >= 1, got {self.max_new_tokens}", reason="bad_option")
        if self.timestamps and settings.timestamp_begin is None:
            raise InputError("TIMESTAMPS: this model has no timestamp tokens", reason="bad_option")
        prompt = (self.prompt or "").strip() or None
        if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(
                f"PROMPT: {len(prompt)} characters exceed the {MAX_PROMPT_CHARS} character limit", reason="bad_option"
            )
        temperature = round(float(self.temperature), 6)  # as sent (FP32 on the wire)
        if not np.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise InputError(
                f"TEMPERATURE: must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {temperature:g}",
                reason="bad_option",
            )
        if not 1 <= int(self.beam_size) <= MAX_BEAM_SIZE:
            raise InputError(
                f"BEAM_SIZE: must be between 1 and {MAX_BEAM_SIZE}, got {self.beam_size}", reason="bad_option"
            )
        if not np.isfinite(self.length_penalty) or not -2 <= self.length_penalty <= 2:
            raise InputError(
                f"LENGTH_PENALTY: must be between -2 and 2, got {self.length_penalty:g}", reason="bad_option"
            )
        if not np.isfinite(self.patience) or not 0 < self.patience <= 4:
            raise InputError(f"PATIENCE: must be in (0, 4], got {self.patience:g}", reason="bad_option")
        return DecodeOptions(
            language,
            task,
            self.max_new_tokens,
            bool(self.timestamps),
            prompt,
            temperature,
            bool(self.fallback),
            None if self.seed is None else int(self.seed),
            beam_size=int(self.beam_size),
            length_penalty=round(float(self.length_penalty), 6),
            patience=round(float(self.patience), 6),
            vad=bool(self.vad),
            condition=bool(self.condition),
            word_timestamps=bool(self.word_timestamps),
        )

    def original_span(self, start_s: float, end_s: float) -> tuple[float, float]:
        """A segment's times on the decoded audio as times on the original file (they differ after VAD)."""
        if not self.speech_ends:
            return start_s, end_s
        from tritonkit.vad import SpeechMap

        return SpeechMap(tuple(self.speech_ends), tuple(self.speech_silences)).original_span(start_s, end_s)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DecodeOptions:
        return cls(**json.loads(text))


Cache = dict[str, np.ndarray]  # graph tensors of one batch by name (cross or self-attention KV), rows first


def taken(cache: Cache, rows) -> Cache:
    """The rows `rows` (indices or a mask) of every tensor; the tensors themselves when that is
    every row in order (a cross KV runs to GBs)."""
    index = np.asarray(rows)
    count = len(next(iter(cache.values())))
    if index.dtype == bool:
        index = np.flatnonzero(index)
    if len(index) == count and np.array_equal(index, np.arange(count)):
        return cache
    return {name: value[index] for name, value in cache.items()}


def compacted(cache: Cache, keep: np.ndarray) -> Cache:
    """The rows `keep` marks, moved to the front of each tensor in place (no copy of the rest)."""
    kept = np.flatnonzero(keep)
    for target, source in enumerate(kept):  # sources never lie before their targets
        if target != source:
            for value in cache.values():
                value[target] = value[source]
    return {name: value[: len(kept)] for name, value in cache.items()}


def swap_removed(cache: Cache, starts: list[int], size: int) -> tuple[Cache, list[int]]:
    """The blocks of `size` rows at `starts` kept, every other block (all of `size` rows) dropped:
    the kept blocks already among the first len(starts) stay, the others move into the holes, in
    place. Returns the view of those rows and the blocks' order in it (indices into `starts`)."""
    kept = len(starts) * size
    order: list[int | None] = [None] * len(starts)
    moving = []
    for k, start in enumerate(starts):
        if start < kept:
            order[start // size] = k
        else:
            moving.append(k)
    for slot, k in zip([slot for slot, found in enumerate(order) if found is None], moving):
        for value in cache.values():
            value[slot * size : (slot + 1) * size] = value[starts[k] : starts[k] + size]
        order[slot] = k
    return {name: value[:kept] for name, value in cache.items()}, [k for k in order if k is not None]


@dataclass
class Beams:
    """One window's beam search, as transformers' `_beam_search` runs it: 2 x beams candidates a
    step, finished beams scored sum / length ** length_penalty, its early-stop heuristic; OpenAI's
    patience sets how many finished beams the window waits for (1.0: the beam size)."""

    width: int
    pool_size: int  # finished beams kept
    length_penalty: float
    live: list[tuple[float, list[int]]] = field(default_factory=lambda: [(0.0, [])])  # (summed log-probability, tokens)
    finished: list[tuple[float, float, list[int]]] = field(default_factory=list)  # (score, sum, tokens)
    improvable: bool = True

    @classmethod
    def of(cls, options: DecodeOptions) -> Beams:
        width = options.beam_size
        return cls(width, max(width, round(width * options.patience)), options.length_penalty)

    def advance(
        self, logprobs: np.ndarray, best_tokens: np.ndarray, end_token: int, limit: int
    ) -> list[tuple[int, int]]:
        """One step: `logprobs` and `best_tokens` (each beam's best 2 x width tokens, unordered)
        have a row per live beam, in order. Returns the beams that go on as (parent beam, token),
        best first; none when the window is done (then `best` is its result)."""
        beams, vocab = len(self.live), logprobs.shape[1]
        sums = np.array([s for s, _ in self.live], dtype=np.float32)
        totals = (logprobs[np.arange(beams)[:, None], best_tokens] + sums[:, None]).ravel()
        flat = (np.arange(beams)[:, None] * vocab + best_tokens).ravel()
        order = np.lexsort((flat, -totals))[: 2 * self.width]  # best first; ties: lower beam, token
        length = len(self.live[0][1]) + 1  # tokens after this step, the end token included
        candidates = []
        for rank, k in enumerate(order):
            beam, token = divmod(int(flat[k]), vocab)
            total = float(totals[k])
            tokens = self.live[beam][1]
            hits = token == end_token or length >= limit
            candidates.append((total, beam, token, hits))
            if hits and rank < self.width and self.improvable and np.isfinite(total):
                kept = tokens if token == end_token else [*tokens, token]
                self.finished.append((total / length**self.length_penalty, total, kept))
        self.finished = sorted(self.finished, key=lambda f: -f[0])[: self.pool_size]
        running = [c for c in candidates if not c[3]][: self.width]
        self.live = [(total, [*self.live[beam][1], token]) for total, beam, token, _ in running]
        if self.improvable and len(self.finished) >= self.pool_size and running:
            self.improvable = running[0][0] / length**self.length_penalty > min(f[0] for f in self.finished)
        return [(beam, token) for _, beam, token, _ in running] if self.improvable and running else []

    def best(self) -> tuple[float, list[int]]:
        """The best finished beam's summed log-probability and tokens (a live one if none finished)."""
        if self.finished:
            return self.finished[0][1], list(self.finished[0][2])
        total, tokens = self.live[0] if self.live else (0.0, [])
        return total, list(tokens)


class WindowDecoder:
    """Decoding of many windows at once over two ONNX Runtime sessions (greedy, sampled, fallback)."""

    def __init__(self, cross_kv_session, step_session, settings: DecodeSettings, prompt_ids=None, text_of=None):
        # prompt_ids(text) -> [<|startofprev|>, tokens of " " + text] (the tokenizer's get_prompt_ids);
        # text_of(tokens) -> the decoded text (FALLBACK measures its compression ratio)
        self.prompt_ids = prompt_ids
        self.text_of = text_of
        self.cross_kv = cross_kv_session
        self.step = step_session
        self.settings = settings
        vocab = step_session.get_outputs()[0].shape[-1]
        self.suppress = np.zeros(vocab, dtype=bool)
        self.suppress[[t for t in settings.suppress_tokens if t < vocab]] = True
        self.begin_suppress = self.suppress.copy()
        self.begin_suppress[[t for t in settings.begin_suppress_tokens if t < vocab]] = True
        self.suppress_ids, self.begin_suppress_ids = np.flatnonzero(self.suppress), np.flatnonzero(self.begin_suppress)
        # the graphs' cache tensors, by name: cross KV (the cross-KV graph's outputs, the step's
        # inputs), the self-attention cache (PAST_* in, PRESENT_* out); fixed dims of an empty cache
        self.cross_names = [o.name for o in cross_kv_session.get_outputs()]
        self.past_names = [i.name for i in step_session.get_inputs() if i.name.startswith("PAST_")]
        self.present_names = [o.name.replace("PRESENT_", "PAST_", 1) for o in step_session.get_outputs()[1:]]
        self.empty_shapes = {
            i.name: tuple(d if isinstance(d, int) else 0 for d in i.shape[1:])
            for i in step_session.get_inputs()
            if i.name in self.past_names
        }
        self.steps_per_window: list[int] = []  # decoder steps each window of the last `decode` took (metrics)
        # per window of the last `decode`, as OpenAI's DecodingResult: the summed log-probability of
        # the chosen tokens (end token included) and the probability of <|nospeech|> after <|startoftranscript|>
        self.sum_logprobs: list[float] = []
        self.no_speech_probs: list[float] = []
        self.temperatures: list[float] = []  # the temperature each window was last decoded at
        self.skipped: list[bool] = []  # windows FALLBACK judged silent (no text, no segments)

    CROSS_KV_ROWS_PER_RUN = 4  # the cross-KV graph's slices: its arena at 4 windows, not the largest batch's

    def _cross_attention(self, encoder_hidden: np.ndarray) -> Cache:
        """Every layer's cross-attention keys and values, computed in slices and written into one
        array each (ONNX Runtime would otherwise keep an arena block the size of the largest batch)."""
        feed = {"ENCODER_HIDDEN": encoder_hidden}
        outputs = run_in_slices(lambda part: self.cross_kv.run(None, part), feed, self.CROSS_KV_ROWS_PER_RUN)
        return dict(zip(self.cross_names, outputs))

    def _empty_past(self, count: int) -> Cache:
        return {name: np.zeros((count, *shape), dtype=np.float32) for name, shape in self.empty_shapes.items()}

    def _run(
        self, ids: np.ndarray, past: Cache, cross: Cache, offsets: np.ndarray | None = None
    ) -> tuple[np.ndarray, Cache]:
        """One decoder step: the last position's logits and the grown self-attention cache.
        `offsets`: each row's left padding (rows left-padded in one cache; none: no row is padded)."""
        feed = {"INPUT_IDS": ids, **past, **cross}
        feed[OFFSETS] = offsets if offsets is not None else np.zeros((len(ids), 1), dtype=np.int64)
        logits, *present = self.step.run(None, feed)
        return logits, dict(zip(self.present_names, present))

    def _start_logits(self, cross: Cache) -> np.ndarray:
        """The logits after <|startoftranscript|> alone: language detection and no-speech probability."""
        count = len(next(iter(cross.values())))
        ids = np.full((count, 1), self.settings.start_token, dtype=np.int64)
        return self._run(ids, self._empty_past(count), cross)[0]

    def detect_languages(self, cross: Cache) -> list[str]:
        logits = self._start_logits(cross)
        codes = list(self.settings.language_tokens)
        token_ids = np.array([self.settings.language_tokens[c] for c in codes])
        return [codes[i] for i in logits[:, token_ids].argmax(axis=1)]

    def prompt(self, options: DecodeOptions, language: str | None) -> list[int]:
        s = self.settings
        tokens = []
        if options.previous is not None:  # transformers' _prepare_decoder_input_ids: the last 223 tokens
            if s.prev_sot_token is None:
                raise ValueError("conditioning on previous text needs <|startofprev|> in the decode settings")
            tokens = [s.prev_sot_token, *options.previous[-(s.max_target_positions // 2 - 1) :]]
        elif options.prompt:
            if self.prompt_ids is None:
                raise InputError("PROMPT: this decoder has no tokenizer for prompts", reason="bad_option")
            tokens = list(self.prompt_ids(options.prompt))
            if len(tokens) > s.max_target_positions // 2:  # the other half is for the transcript
                raise InputError(
                    f"PROMPT: {len(tokens)} tokens exceed the {s.max_target_positions // 2} token limit "
                    "(half the decoder's context)",
                    reason="too_long",
                )
        tokens.append(s.start_token)
        if s.multilingual:
            if language is None:
                raise ValueError("a multilingual prompt needs the language (given or detected)")
            tokens += [s.language_tokens[language], s.task_tokens[options.task]]
        if s.no_timestamps_token is not None and not options.timestamps:
            tokens.append(s.no_timestamps_token)
        return tokens

    def decode(
        self, encoder_hidden: np.ndarray, options: list[DecodeOptions], on_final=None
    ) -> tuple[list[list[int]], list[str | None]]:
        """Tokens (without prompt and end token) and the language decoded in, one per window.

        A multilingual model detects the language of each window that has none given.
        `on_final(windows, results, languages)` is called after each pass with the windows whose
        tokens and figures are final, before the windows that fall back are decoded again."""
        count = len(encoder_hidden)
        cross: Cache | None = self._cross_attention(encoder_hidden)
        assert cross is not None
        languages = self._languages(cross, options)
        prompts = [self.prompt(o, lang) for o, lang in zip(options, languages)]
        limits = [
            min(o.max_new_tokens or self.settings.max_length, self.settings.max_target_positions - len(p))
            for p, o in zip(prompts, options)
        ]
        results: list[list[int]] = [[] for _ in range(count)]
        self.steps_per_window = [0] * count
        self.sum_logprobs = [0.0] * count
        self.no_speech_probs = [float("nan")] * count
        self.skipped = [o.empty for o in options]  # nothing to decode: skipped from the start
        schedules = [temperature_schedule(o.temperature, o.fallback) for o in options]
        self.temperatures = [schedule[0] for schedule in schedules]
        measured = [i for i, o in enumerate(options) if o.timestamps or o.fallback]
        if measured and self.settings.no_timestamps_token is not None:
            first = self._start_logits(taken(cross, measured))
            no_speech = self.settings.no_timestamps_token - 1  # <|nospeech|> (<|nocaptions|> in older vocabularies)
            for i, probs in zip(measured, softmax(first)):
                self.no_speech_probs[i] = float(probs[no_speech])
        generators = [
            np.random.default_rng([o.seed & (2**63 - 1), o.window]) if o.seed is not None else np.random.default_rng()
            for o in options
        ]
        pending, attempt = [i for i, o in enumerate(options) if not o.empty], 0
        while pending:
            # Rows decode together whatever their prompts' lengths: greedy and sampled ones in one
            # group, beam search (at temperature 0 only, as transformers falls back to sampling) in another.
            groups: dict[bool, list[int]] = {}
            for i in pending:
                groups.setdefault(options[i].beam_size > 1 and self.temperatures[i] == 0, []).append(i)
            for beams, rows in groups.items():
                for i in rows:
                    results[i], self.sum_logprobs[i] = [], 0.0
                if cross is None:  # the first pass consumed it: computed again for these windows
                    owned = self._cross_attention(encoder_hidden[rows])
                elif len(groups) == 1 and rows == list(range(count)) and not beams:
                    # every window in one group: the pass takes the cross KV itself (compacted in place
                    # as windows finish), so the batch never holds a second copy of it
                    owned, cross = cross, None
                else:
                    owned = taken(cross, rows)
                if beams:
                    self._beam_rows(rows, prompts, limits, owned, results, options)
                else:
                    self._decode_rows(rows, prompts, limits, owned, results, options, generators)
                del owned
            attempt += 1
            again = self._fall_back(pending, attempt, options, schedules, results)
            if on_final is not None:
                final = set(again)
                done = [i for i in pending if i not in final]
                if attempt == 1:
                    done += [i for i, o in enumerate(options) if o.empty]
                on_final(done, results, languages)
            pending = again
        return results, languages

    def _languages(self, cross: Cache, options: list[DecodeOptions]) -> list[str | None]:
        """Each window's language: given, or (a multilingual model) detected from its audio."""
        if not self.settings.multilingual:
            return ["en"] * len(options)
        languages: list[str | None] = [o.language or None for o in options]
        undetected = [i for i, lang in enumerate(languages) if lang is None]
        if undetected:
            for i, code in zip(undetected, self.detect_languages(taken(cross, undetected))):
                languages[i] = code
        return languages

    def _fall_back(
        self,
        pending: list[int],
        attempt: int,
        options: list[DecodeOptions],
        schedules: list[tuple[float, ...]],
        results: list[list[int]],
    ) -> list[int]:
        """OpenAI's fallback after a pass: the windows to decode again at their next temperature
        (too unlikely or repetitive, not silent, temperatures left); a silent unlikely window is
        skipped."""
        again = []
        for i in pending:
            if not options[i].fallback:
                continue
            too_unlikely, too_repetitive = self._judge(i, results[i])
            silent = self.no_speech_probs[i] > NO_SPEECH_THRESHOLD
            if (too_unlikely or too_repetitive) and not silent and attempt < len(schedules[i]):
                self.temperatures[i] = schedules[i][attempt]
                again.append(i)
            else:
                self.skipped[i] = silent and too_unlikely
        return again

    def _judge(self, row: int, tokens: list[int]) -> tuple[bool, bool]:
        return self.judge(self.sum_logprobs[row], tokens)

    def judge(self, sum_logprob: float, tokens: list[int]) -> tuple[bool, bool]:
        """(too unlikely, too repetitive) under OpenAI's thresholds: a window's decoding, given
        its chosen tokens' summed log-probability (end token included)."""
        if self.text_of is None:
            raise ValueError("FALLBACK needs the decoder's tokenizer (text_of)")
        too_unlikely = avg_logprob(sum_logprob, tokens) < LOGPROB_THRESHOLD
        return too_unlikely, compression_ratio(self.text_of(tokens)) > COMPRESSION_RATIO_THRESHOLD

    def apply_timestamp_rules(self, logits: np.ndarray, generated: list[int], first: bool) -> None:
        """Whisper's timestamp rules on one row's logits, in place, as transformers'
        WhisperTimeStampLogitsProcessor applies them (OpenAI's ApplyTimestampRules)."""
        begin, s = self.settings.timestamp_begin, self.settings
        assert begin is not None
        logits[s.no_timestamps_token] = -np.inf
        last_was = len(generated) >= 1 and generated[-1] >= begin
        penultimate_was = len(generated) < 2 or generated[-2] >= begin
        if last_was:
            if penultimate_was:  # a pair is complete: text next
                logits[begin:] = -np.inf
            else:  # a timestamp opened a pair: a timestamp or the end next
                logits[: s.end_token] = -np.inf
        stamps = [t for t in generated if t >= begin]
        if stamps:  # timestamps never decrease (and <|0.00|> is not emitted again)
            logits[begin : stamps[-1] if last_was and not penultimate_was else stamps[-1] + 1] = -np.inf
        if first:
            logits[:begin] = -np.inf
            if s.max_initial_timestamp_index is not None:
                logits[begin + s.max_initial_timestamp_index + 1 :] = -np.inf
        # timestamps' summed probability above the likeliest text token's: a timestamp next. Compared
        # on the logits themselves (log-softmax subtracts the same constant from both sides).
        stamps_part = logits[begin:]
        finite = stamps_part[np.isfinite(stamps_part)].astype(np.float64)
        if finite.size:
            most = finite.max()
            if most + np.log(np.exp(finite - most).sum()) > logits[:begin].max():
                logits[:begin] = -np.inf

    def _choose(self, logits: np.ndarray, rows: np.ndarray, generators) -> np.ndarray:
        """Each row's next token: the most likely, or sampled at the row's temperature."""
        chosen = logits.argmax(axis=1)
        for j, row in enumerate(rows):
            temperature = self.temperatures[row]
            if temperature > 0:
                scaled = logits[j].astype(np.float64) / temperature
                probs = np.exp(scaled - scaled.max())
                cumulative = np.cumsum(probs)
                chosen[j] = int(np.searchsorted(cumulative, generators[row].random() * cumulative[-1], side="right"))
        return chosen

    def _decode_rows(self, rows, prompts, limits, cross: Cache, results, options, generators) -> None:
        """Greedy or sampled decoding of `rows`, whose cross KV (one row each, in order) this pass
        owns: finished rows are compacted out of it in place, not copied.

        Prompts may differ in length (a long file's window conditioned on its previous text, a
        PROMPT): the first run takes every row's first `shortest` prompt tokens at once, then a row
        still in its prompt feeds its next prompt token while the others feed their last chosen
        one, so every row's cache stays one contiguous sequence and the step needs no padding mask."""
        active = np.array(rows)
        lengths = np.array([len(prompts[i]) for i in rows])
        fed = np.full(len(rows), lengths.min())  # prompt tokens in each row's cache after the run
        started = np.zeros(len(rows), dtype=bool)  # has chosen a token
        ids = np.array([prompts[i][: fed[0]] for i in rows], dtype=np.int64)
        past = self._empty_past(len(rows))
        while len(active):
            logits, past = self._run(ids, past, cross)
            for row in active:
                self.steps_per_window[row] += 1
            choosing = fed >= lengths  # whose logits predict a token of theirs (the rest are in their prompt)
            for j in np.flatnonzero(choosing):
                row, first = active[j], not started[j]
                logits[j, self.begin_suppress_ids if first else self.suppress_ids] = -np.inf
                if options[row].timestamps:
                    self.apply_timestamp_rules(logits[j], results[row], first)
            picked = np.flatnonzero(choosing)
            next_ids = np.zeros(len(active), dtype=np.int64)
            keep = np.ones(len(active), dtype=bool)
            if len(picked):
                tokens = self._choose(logits[picked], active[picked], generators)
                chosen = log_softmax(logits[picked])[np.arange(len(picked)), tokens]
                for j, token, logprob in zip(picked, tokens, chosen):
                    row = active[j]
                    self.sum_logprobs[row] += float(logprob)
                    next_ids[j] = token
                    if token == self.settings.end_token:
                        keep[j] = False
                        continue
                    results[row].append(int(token))
                    if len(results[row]) >= limits[row]:
                        keep[j] = False
            for j in np.flatnonzero(~choosing):
                next_ids[j] = prompts[active[j]][fed[j]]
                fed[j] += 1
            started |= choosing
            if not keep.all():
                cross = compacted(cross, keep)
                active, past, next_ids = active[keep], taken(past, keep), next_ids[keep]
                lengths, fed, started = lengths[keep], fed[keep], started[keep]
            ids = next_ids[:, None]

    def _beam_rows(self, rows, prompts, limits, cross: Cache, results, options) -> None:
        """Beam search over many windows at once, as transformers' `_beam_search` does it (2 x beams
        candidates a step, finished beams scored sum / length ** length_penalty, its early-stop
        heuristic), every window's live beams sharing one batched decoder step. OpenAI's patience
        sets how many finished beams a window waits for (1.0: the beam size, transformers' rule).
        `cross` holds one row per window of `rows`, in order.

        Prompts may differ in length, as in `_decode_rows`: a window still in its prompt has one
        beam, which feeds its next prompt token, and branches once its prompt is in its cache."""

        @dataclass
        class Window:
            row: int
            beams: Beams
            prompt: list[int]
            fed: int  # prompt tokens in its cache

            @property
            def live(self) -> list[tuple[float, list[int]]]:
                return self.beams.live

            @property
            def in_prompt(self) -> bool:  # its last logits predict a token of its own prompt
                return self.fed < len(self.prompt)

        shortest = min(len(prompts[i]) for i in rows)
        windows = [Window(row, Beams.of(options[row]), list(prompts[row]), shortest) for row in rows]
        count = len(rows)
        ids = np.array([prompts[i][:shortest] for i in rows], dtype=np.int64)
        past = self._empty_past(count)
        position = {row: j for j, row in enumerate(rows)}
        # Graphs whose cross attention is per window (`cross_kv_per_window`): every window has
        # `group` rows (its live beams, then copies of its first beam that are not read), and the
        # cross KV keeps one row per window, which all its rows attend to. Older graphs: one cross
        # KV row per live beam (a copy of its window's), and the window of each of its rows.
        share = self.settings.cross_kv_per_window
        beam_cross, layout, owned = cross, list(rows), False
        group = 1
        while windows:
            if share:
                starts_now = [k * group for k in range(len(windows))]
            else:
                owners = [w.row for w in windows for _ in w.live]
                if layout != owners:
                    beam_cross, layout = taken(cross, [position[row] for row in owners]), owners
                starts_now = list(np.cumsum([0] + [len(w.live) for w in windows[:-1]]))
            sizes = {len(w.live) for w in windows}
            logits, past = self._run(ids, past, beam_cross)
            for window in windows:
                self.steps_per_window[window.row] += len(window.live)
            logprobs = self._beam_logprobs(logits, windows, starts_now, options)
            # each beam's best 2 x beams tokens (unordered): a window's best candidates are among its beams'
            widest = 2 * max(w.beams.width for w in windows)
            best_tokens = top_indices(logprobs, widest)
            still, starts = [], []  # the windows that go on, and where their rows were in this step
            chosen: dict[int, tuple[list[int], list[int]]] = {}  # window -> (its beams' parent rows, next ids)
            for window, start in zip(windows, starts_now):
                beams = len(window.live)
                if window.in_prompt:  # one beam, fed its next prompt token
                    chosen[window.row] = ([start], [window.prompt[window.fed]])
                    window.fed += 1
                    still.append(window)
                    starts.append(start)
                    continue
                running = window.beams.advance(
                    logprobs[start : start + beams],
                    best_tokens[start : start + beams],
                    self.settings.end_token,
                    limits[window.row],
                )
                if running:
                    still.append(window)
                    starts.append(start)
                    chosen[window.row] = ([start + beam for beam, _ in running], [t for _, t in running])
                else:
                    self.sum_logprobs[window.row], results[window.row] = window.beams.best()
            if not still:
                return
            if share:
                if len(still) < len(windows):  # finished windows' cross KV rows leave (in place once owned)
                    keep = np.isin([w.row for w in windows], [w.row for w in still])
                    beam_cross = compacted(beam_cross, keep) if owned else taken(beam_cross, keep)
                    owned = True
                group = max(len(chosen[w.row][0]) for w in still)
                parents, next_ids = [], []
                for w in still:  # padded to `group` rows with copies of the window's first beam
                    mine, tokens = chosen[w.row]
                    parents += mine + mine[:1] * (group - len(mine))
                    next_ids += tokens + tokens[:1] * (group - len(tokens))
                windows = still
                past = taken(past, np.array(parents))
                ids = np.array(next_ids, dtype=np.int64)[:, None]
                continue
            size = len(still[0].live)
            if (
                len(still) < len(windows)
                and sizes == {len(w.live) for w in still} == {size}
                and beam_cross is not cross
            ):
                # windows finished and every beam count stayed: the last windows' cross KV moved into
                # the rows of the finished ones (in place; a full gather would copy every beam's)
                beam_cross, order = swap_removed(beam_cross, starts, size)
                still = [still[k] for k in order]
                layout = [w.row for w in still for _ in w.live]
            windows = still
            past = taken(past, np.array([parent for w in windows for parent in chosen[w.row][0]]))
            ids = np.array([token for w in windows for token in chosen[w.row][1]], dtype=np.int64)[:, None]

    def _beam_logprobs(self, logits: np.ndarray, windows: list, starts: list[int], options) -> np.ndarray:
        """A beam step's log-probabilities with the processors' masks (float32, as transformers):
        suppressed tokens (at a window's first token, its own list), and the timestamp rules."""
        logprobs = log_softmax32(logits)
        opening, going = list[int](), list[int]()  # rows choosing their window's first token, and later ones
        for window, start in zip(windows, starts):
            if not window.in_prompt:
                first = not window.live[0][1]
                (opening if first else going).extend(range(start, start + len(window.live)))
        logprobs[np.array(opening, dtype=np.int64)[:, None], self.begin_suppress_ids] = -np.inf
        logprobs[np.array(going, dtype=np.int64)[:, None], self.suppress_ids] = -np.inf
        for window, start in zip(windows, starts):
            if options[window.row].timestamps and not window.in_prompt:
                for b, (_, tokens) in enumerate(window.live):
                    self.apply_timestamp_rules(logprobs[start + b], tokens, not tokens)
        return logprobs


@dataclass
class FileTranscript:
    """A long-form file's result: its segments (start, end, tokens, window figures) and language."""

    segments: list[tuple[float, float, list[int], tuple[float, float, float, float]]] = field(default_factory=list)
    language: str | None = None
    steps: int = 0
    words: list[tuple[float, float, str, float]] = field(default_factory=list)  # with word timestamps
    last_speech: float = 0.0  # the end of its last timed word's segment (faster-whisper's last_speech_timestamp)


def window_segments(
    tokens: list[int], timestamp_begin: int, offset_s: float, window_frames: int
) -> tuple[list[tuple[float, float, list[int]]], int]:
    """A long-form window's segments and how many mel frames to seek on: transformers'
    `_retrieve_segment` (OpenAI's: after complete pairs of timestamps, seek to the last one)."""
    stamps = [t >= timestamp_begin for t in tokens]
    single_ending = stamps[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(stamps) - 1) if stamps[i] and stamps[i + 1]]
    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        else:
            cuts[-1] += 1  # the last segment keeps its closing timestamp
        found, last = [], 0
        for k, cut in enumerate(cuts):
            piece = tokens[last:cut]
            end_index = -1 if k < len(cuts) - 1 or single_ending else -2
            found.append(
                (
                    offset_s + (piece[0] - timestamp_begin) * TIME_PRECISION,
                    offset_s + (piece[end_index] - timestamp_begin) * TIME_PRECISION,
                    piece,
                )
            )
            last = cut
        if single_ending:
            return found, window_frames
        return found, (tokens[last - 2] - timestamp_begin) * INPUT_STRIDE
    times = [t for t in tokens if t >= timestamp_begin]
    end_position = window_frames * SECONDS_PER_FRAME / TIME_PRECISION
    if times and times[-1] != timestamp_begin:
        end_position = times[-1] - timestamp_begin
    return [(offset_s, offset_s + end_position * TIME_PRECISION, tokens)], window_frames


def conditioning(segments: list[tuple[float, float, list[int], tuple]], timestamp_begin: int) -> list[int]:
    """The tokens the next window is conditioned on: every segment so far, a closing double
    timestamp cut to one (transformers' _pad_to_max_length with skip_ending_double_timestamps)."""
    out: list[int] = []
    for _, _, tokens, _ in segments:
        out += tokens[:-1] if len(tokens) > 2 and tokens[-2] >= timestamp_begin else tokens
    return out


@dataclass
class WindowResult:
    """One window's decoding, final (after any fallback): its tokens (no prompt, no end token),
    its language, the decoder steps it took and OpenAI's per-window figures."""

    tokens: list[int]
    language: str | None
    steps: int = 0
    sum_logprob: float = 0.0  # the chosen tokens' summed log-probability, end token included
    no_speech_prob: float = float("nan")
    temperature: float = 0.0  # the temperature it was last decoded at
    skipped: bool = False  # FALLBACK judged it silent: no text, no segments

    def stats(self, text: str) -> tuple[float, float, float, float]:
        """avg_logprob, compression_ratio, no_speech_prob, temperature (`text`: its tokens' text)."""
        return (
            avg_logprob(self.sum_logprob, self.tokens),
            compression_ratio(text),
            self.no_speech_prob,
            self.temperature,
        )

    @classmethod
    def of(cls, decoder: WindowDecoder, row: int, tokens: list[int], language: str | None) -> WindowResult:
        """Window `row` of the decoder's last `decode`."""
        return cls(
            tokens,
            language,
            decoder.steps_per_window[row],
            decoder.sum_logprobs[row],
            decoder.no_speech_probs[row],
            decoder.temperatures[row],
            decoder.skipped[row],
        )


class SequentialFile:
    """One file's OpenAI sequential long-form transcription, as transformers' long-form
    `generate` runs it: the current 30 s window (its features from the seek point, zero-padded)
    is decoded, and its timestamps tell where the next window starts. `next_window` gives the
    window to decode, `window_done` takes its result; `transcript` grows segment by segment."""

    def __init__(self, features: np.ndarray, options: DecodeOptions, decoder: WindowDecoder):
        if decoder.settings.timestamp_begin is None:
            raise InputError(
                "TIMESTAMPS: this model has no timestamp tokens for long-form decoding", reason="bad_option"
            )
        self.features, self.options, self.decoder = features, options, decoder
        self.begin = decoder.settings.timestamp_begin
        self.seek = 0
        self.index = 0  # windows decoded
        self.condition = options.condition
        self.language = options.language
        # transformers' "first-segment" prompt: the prompt counts as text before the file
        prompt_ids = decoder.prompt_ids
        self.prefix = list(prompt_ids(options.prompt))[1:] if options.prompt and prompt_ids else []
        self.transcript = FileTranscript()

    @property
    def done(self) -> bool:
        return self.options.empty or self.seek >= self.options.total_frames

    @property
    def frames(self) -> int:
        """The current window's frames of audio."""
        return min(FRAMES_PER_WINDOW, self.options.total_frames - self.seek)

    def next_window(self) -> tuple[np.ndarray, DecodeOptions]:
        """The current window's features ([mel bins, 3000], zero-padded) and options."""
        o, frames = self.options, self.frames
        window = np.zeros((self.features.shape[0], FRAMES_PER_WINDOW), dtype=np.float32)
        window[:, :frames] = self.features[:, self.seek : self.seek + frames]
        previous = self.prefix + conditioning(self.transcript.segments, self.begin)
        return window, replace(
            o,
            language=self.language,
            timestamps=True,
            prompt=o.prompt if not self.condition else None,
            previous=tuple(previous) if self.condition and previous else None,
            offset_s=self.seek * SECONDS_PER_FRAME,
            duration_s=frames * SECONDS_PER_FRAME,
            window=self.index,
        )

    @property
    def encoded(self) -> bool:
        """The current window's encoder output came with the request (the ensemble's first window)."""
        return self.index == 0 and self.options.first_window_encoded

    def window_done(self, result: WindowResult) -> None:
        frames, o = self.frames, self.options
        self.index += 1
        self.transcript.steps += result.steps
        self.language = self.language or result.language
        self.transcript.language = self.transcript.language or result.language
        self.condition = o.condition and result.temperature < 0.5
        if result.skipped:
            self.seek += frames
            return
        found, advance = window_segments(result.tokens, self.begin, self.seek * SECONDS_PER_FRAME, frames)
        stats = result.stats(self.decoder.text_of(result.tokens) if self.decoder.text_of else "")
        duration = o.file_s or o.total_frames * SECONDS_PER_FRAME  # a time past the file's end is its end
        self.transcript.segments += [
            (min(start, duration), min(end, duration), piece, stats) for start, end, piece in found
        ]
        self.seek += advance if advance > 0 else frames  # never stand still


class LongForm:
    """Sequential long-form transcription of many files at once (`SequentialFile` each): every
    file's current window is one row of a batch. `encode(features)` runs the encoder on a batch
    of windows; a file whose options say `first_window_encoded` has its first window's encoder
    output in `first_hidden` (not encoded again)."""

    def __init__(self, decoder: WindowDecoder, encode):
        self.decoder = decoder
        self.encode = encode

    def transcribe(
        self, features: list[np.ndarray], options: list[DecodeOptions], first_hidden: np.ndarray | None = None
    ) -> list[FileTranscript]:
        files = [SequentialFile(f, o, self.decoder) for f, o in zip(features, options)]
        given = first_hidden if first_hidden is not None else [None] * len(files)
        while True:
            active = [i for i, file in enumerate(files) if not file.done]
            if not active:
                return [file.transcript for file in files]
            windows, window_options = zip(*(files[i].next_window() for i in active))
            reused = [given[i] if files[i].encoded else None for i in active]
            if all(r is not None for r in reused):
                hidden = np.stack([r for r in reused if r is not None])
            else:
                hidden = self.encode(np.stack([w for w, r in zip(windows, reused) if r is None]))
                if any(r is not None for r in reused):
                    encoded = iter(hidden)
                    hidden = np.stack([r if r is not None else next(encoded) for r in reused])
            tokens, languages = self.decoder.decode(hidden, list(window_options))
            for k, i in enumerate(active):
                files[i].window_done(WindowResult.of(self.decoder, k, tokens[k], languages[k]))


def segments(
    tokens: list[int], timestamp_begin: int, offset_s: float, duration_s: float
) -> list[tuple[float, float, list[int]]]:
    """(start, end, text tokens) of each segment of one window's timestamped tokens, on the file's
    timeline. Text after the last timestamp without a closing one ends at the window's end."""
    found: list[tuple[float, float, list[int]]] = []
    start: float | None = None
    text: list[int] = []
    for token in tokens:
        if token < timestamp_begin:
            text.append(token)
            continue
        time = (token - timestamp_begin) * TIME_PRECISION
        if start is not None and text:
            found.append((offset_s + start, offset_s + time, text))
            start, text = None, []
        else:
            start = time  # a segment opens (a repeated timestamp moves its start)
    if text:
        found.append((offset_s + (start or 0.0), offset_s + duration_s, text))
    end_s = offset_s + duration_s  # a predicted time past the window's audio is its end
    return [(min(start, end_s), min(end, end_s), text) for start, end, text in found]


def top_indices(scores: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """Each row's k largest scores' indices (unordered; ties broken arbitrarily), as
    `np.argpartition(scores, -k)[:, -k:]` gives them, at a fraction of its cost on wide rows: the
    k-th largest of the rows' block maxima bounds the k-th largest score from below, and few
    scores reach it."""
    rows, width = scores.shape
    whole = width // block * block
    if whole // block < k:
        return np.argpartition(scores, -k, axis=1)[:, -k:]
    maxima = scores[:, :whole].reshape(rows, -1, block).max(axis=2)
    bound = np.partition(maxima, -k, axis=1)[:, -k]
    row_of, column = np.nonzero(scores >= bound[:, None])  # at least k a row: the blocks' maxima reach it
    counts = np.bincount(row_of, minlength=rows)
    if (counts == k).all():
        return column.reshape(rows, k)
    chosen = np.empty((rows, k), dtype=np.int64)
    ends = np.cumsum(counts)
    for row, (end, count) in enumerate(zip(ends, counts)):
        candidates = column[end - count : end]
        if count > k:
            candidates = candidates[np.argpartition(scores[row, candidates], -k)[-k:]]
        chosen[row] = candidates
    return chosen


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (rows may hold -inf for suppressed tokens)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def log_softmax32(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, in a new array."""
    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def avg_logprob(sum_logprob: float, tokens: list[int]) -> float:
    """OpenAI's: the chosen tokens' summed log-probability (end token included) over their count + 1."""
    return sum_logprob / (len(tokens) + 1)


def compression_ratio(text: str) -> float:
    """OpenAI's repetition measure: UTF-8 bytes over their zlib-compressed size."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0
