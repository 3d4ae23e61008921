"""Word-level timestamps from Whisper's cross-attention, as openai-whisper's `timing.py` computes them.

A window's final text is run once more through the decoder, teacher-forced, by the alignment graph
(`Alignment`): it returns the cross-attention scores of the model's alignment heads (the heads
whose attention follows the speech; the checkpoint's `alignment_heads`) and each text token's
probability. On those: softmax over the window's audio frames, each frame's scores standardised
across tokens, a median filter along time, the heads averaged, and dynamic time warping pairs
every token with the frame where the monotonic path first reaches it. Words are the tokenizer's
(on spaces, or on characters for languages written without them), punctuation merged into its
word, and faster-whisper's clamps for words that run across pauses at segment boundaries.

Each window that asks is aligned by one run of the graph when it is final, and the DTW runs
along anti-diagonals so each step is one vectorised update (the recurrence's arithmetic, cell
for cell, is openai-whisper's).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ALIGNMENT_SCORES, TOKEN_PROBS = "ALIGNMENT_SCORES", "TOKEN_PROBS"  # the alignment graph's outputs
TOKENS_PER_SECOND = 50  # the encoder's frames per second (two mel frames each)
MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


def default_alignment_heads(layers: int, heads: int) -> list[tuple[int, int]]:
    """openai-whisper's default when a checkpoint names none: every head of the upper half of
    the decoder's layers."""
    return [(layer, head) for layer in range(layers // 2, layers) for head in range(heads)]


def alignment_heads(generation_config, layers: int, heads: int) -> list[tuple[int, int]]:
    given = getattr(generation_config, "alignment_heads", None)
    if given:
        return [(int(layer), int(head)) for layer, head in given]
    return default_alignment_heads(layers, heads)


def alignment_module(model, heads: Sequence[tuple[int, int]], end_token: int):
    """(ENCODER_HIDDEN [W, frames, d], INPUT_IDS [W, T]) -> (ALIGNMENT_SCORES [W, heads, T, frames]:
    the alignment heads' scaled q.k before softmax, TOKEN_PROBS [W, T]: the probability of the
    token at t + 1 given the tokens up to t, over the text vocabulary (ids below `end_token`)).
    Rows are padded on the right (the decoder is causal: padding changes no earlier position)."""
    import torch

    from tritonkit.whisper_decoding import merge_heads, split_heads

    class Alignment(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = model.model.decoder
            self.proj_out = model.proj_out
            self.heads = model.config.decoder_attention_heads
            self.embed_scale = float(getattr(self.decoder, "embed_scale", 1.0) or 1.0)
            self.wanted = {layer: [h for l2, h in heads if l2 == layer] for layer, _ in heads}
            self.order = list(heads)

        def split(self, x):
            return split_heads(x, self.heads)

        merge = staticmethod(merge_heads)

        def forward(self, encoder_hidden, input_ids):
            length = input_ids.shape[1]
            positions = torch.arange(length)
            hidden = self.decoder.embed_tokens(input_ids) * self.embed_scale + self.decoder.embed_positions.weight[
                positions
            ].unsqueeze(0)
            causal = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
            found = {}
            for index, layer in enumerate(self.decoder.layers):
                residual = hidden
                x = layer.self_attn_layer_norm(hidden)
                attention = layer.self_attn
                q, k, v = (self.split(p(x)) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
                scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + causal
                hidden = residual + attention.out_proj(self.merge(torch.matmul(torch.softmax(scores, -1), v)))
                residual = hidden
                x = layer.encoder_attn_layer_norm(hidden)
                cross = layer.encoder_attn
                q = self.split(cross.q_proj(x))
                k = self.split(cross.k_proj(encoder_hidden))
                v = self.split(cross.v_proj(encoder_hidden))
                scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
                for head in self.wanted.get(index, []):
                    found[(index, head)] = scores[:, head]
                hidden = residual + cross.out_proj(self.merge(torch.matmul(torch.softmax(scores, -1), v)))
                residual = hidden
                x = layer.final_layer_norm(hidden)
                hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(x)))
            logits = self.proj_out(self.decoder.layer_norm(hidden))[..., :end_token]
            probs = torch.softmax(logits.float(), dim=-1)
            following = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).clamp(max=end_token - 1)
            token_probs = torch.gather(probs, 2, following.unsqueeze(-1)).squeeze(-1)
            return torch.stack([found[pair] for pair in self.order], dim=1), token_probs

    return Alignment().eval()


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """openai-whisper's median filter along the last axis (reflect padding)."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.sort(windows, axis=-1)[..., pad]


def dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openai-whisper's dynamic time warping of a cost matrix [tokens, frames]: (text indices,
    time indices) of the path. Cells on one anti-diagonal depend only on the two before it, so
    each diagonal is one vectorised update with the same arithmetic as the cell-by-cell loop."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    x = x.astype(np.float32)
    for d in range(2, n + m + 1):
        rows = np.arange(max(1, d - m), min(n, d - 1) + 1)
        columns = d - rows
        c0, c1, c2 = cost[rows - 1, columns - 1], cost[rows - 1, columns], cost[rows, columns - 1]
        diagonal = (c0 < c1) & (c0 < c2)
        up = ~diagonal & (c1 < c0) & (c1 < c2)
        best = np.where(diagonal, c0, np.where(up, c1, c2))
        cost[rows, columns] = x[rows - 1, columns - 1] + best
        trace[rows, columns] = np.where(diagonal, 0, np.where(up, 1, 2))
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = n, m
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    result = np.array(path[::-1])
    return result[:, 0], result[:, 1]


@dataclass
class Word:
    """One word: its text (with its leading space), tokens, times in seconds and probability."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def split_to_word_tokens(
    tokens: list[int], decode: Callable[[list[int]], str], language: str | None, end_token: int
) -> tuple[list[str], list[list[int]]]:
    """openai-whisper's Tokenizer.split_to_word_tokens: words start at a space (or, for languages
    written without spaces, every complete character is a word); punctuation stands alone."""
    words: list[str] = []
    word_tokens: list[list[int]] = []
    current: list[int] = []
    replacement = "\ufffd"
    full = decode(tokens)
    unicode_offset = 0
    for token in tokens:  # split on complete unicode characters first
        current.append(token)
        decoded = decode(current)
        if replacement not in decoded or full[unicode_offset + decoded.index(replacement)] == replacement:
            words.append(decoded)
            word_tokens.append(current)
            current = []
            unicode_offset += len(decoded)
    if language in UNSPACED_LANGUAGES:
        return words, word_tokens
    spaced: list[str] = []
    spaced_tokens: list[list[int]] = []
    for subword, subword_tokens in zip(words, word_tokens):
        special = subword_tokens[0] >= end_token
        with_space = subword.startswith(" ")
        punctuation = subword.strip() in string.punctuation  # a substring test, as openai-whisper's
        if special or with_space or punctuation or not spaced:
            spaced.append(subword)
            spaced_tokens.append(list(subword_tokens))
        else:
            spaced[-1] += subword
            spaced_tokens[-1].extend(subword_tokens)
    return spaced, spaced_tokens


def find_words(
    scores: np.ndarray,
    token_probs: np.ndarray,
    text_tokens: list[int],
    prompt_length: int,
    frames: int,
    end_token: int,
    decode: Callable[[list[int]], str],
    language: str | None,
) -> list[Word]:
    """openai-whisper's find_alignment for one window, from the alignment graph's outputs for the
    row [*prompt (sot sequence + no-timestamps), *text_tokens, end token]: `scores` [heads, T,
    frames_out], `token_probs` [T]; `frames` is how many mel frames of the window hold audio."""
    if not text_tokens:
        return []
    length = prompt_length + len(text_tokens) + 1
    weights = scores[:, :length, : frames // 2].astype(np.float32)
    weights = weights - weights.max(axis=-1, keepdims=True)
    weights = np.exp(weights)
    weights /= weights.sum(axis=-1, keepdims=True)
    mean = weights.mean(axis=-2, keepdims=True)
    std = weights.std(axis=-2, keepdims=True)
    weights = (weights - mean) / std
    weights = median_filter(weights, MEDIAN_FILTER_WIDTH)
    matrix = weights.mean(axis=0)[prompt_length - 1 : -1]  # the no-timestamps position to the last text token
    text_indices, time_indices = dtw(-matrix)
    text_probs = token_probs[prompt_length - 1 : prompt_length - 1 + len(text_tokens)]
    words, word_tokens = split_to_word_tokens([*text_tokens, end_token], decode, language, end_token)
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    starts = jump_times[boundaries[:-1]]
    ends = jump_times[boundaries[1:]]
    return [
        Word(word, tokens, float(start), float(end), float(np.mean(text_probs[i:j])))
        for word, tokens, start, end, i, j in zip(words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:])
    ]


def merge_punctuations(words: list[Word], prepended: str = PREPEND_PUNCTUATIONS, appended: str = APPEND_PUNCTUATIONS):
    """openai-whisper's: an opening mark joins the word after it, a closing one the word before."""
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        previous, following = words[i], words[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        previous, following = words[i], words[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


@dataclass
class TimedSegment:
    """A segment of one window as the decoder found it: its times (seconds on the file's
    timeline) and tokens."""

    start: float
    end: float
    tokens: list[int]


def window_words(
    words: list[Word], segments: list[TimedSegment], offset_s: float, last_speech: float
) -> tuple[list[list[Word]], float]:
    """faster-whisper's add_word_timestamps for one window's aligned words (times from the
    window's start `offset_s`; `segments` and `last_speech` on the file's timeline): words at
    sentence ends and after pauses no longer than twice the median word, each segment's words on
    the file's timeline (2 decimals), its first and last word held to the segment's times when
    they run far past them. Returns each segment's words and the end of the last speech. The
    segments' own times are left as decoded."""
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for i in range(1, len(words)):
            if words[i].end - words[i].start > longest:
                if words[i].word in SENTENCE_END_MARKS:
                    words[i].end = words[i].start + longest
                elif words[i - 1].word in SENTENCE_END_MARKS:
                    words[i].start = words[i].end - longest
    merge_punctuations(words)
    result: list[list[Word]] = []
    index = 0
    for segment in segments:
        saved = 0
        mine: list[Word] = []
        while index < len(words) and saved < len(segment.tokens):
            timing = words[index]
            if timing.word:
                mine.append(
                    Word(
                        timing.word,
                        timing.tokens,
                        round(offset_s + timing.start, 2),
                        round(offset_s + timing.end, 2),
                        timing.probability,
                    )
                )
            saved += len(timing.tokens)
            index += 1
        if mine:
            if mine[0].end - last_speech > median * 4 and (
                mine[0].end - mine[0].start > longest or (len(mine) > 1 and mine[1].end - mine[0].start > longest * 2)
            ):
                if len(mine) > 1 and mine[1].end - mine[1].start > longest:
                    boundary = max(mine[1].end / 2, mine[1].end - longest)
                    mine[0].end = mine[1].start = boundary
                mine[0].start = max(0, mine[0].end - longest)
            start, end = segment.start, segment.end
            if start < mine[0].end and start - 0.5 > mine[0].start:
                mine[0].start = max(0, min(mine[0].end - median, start))
            if end > mine[-1].start and end + 0.5 < mine[-1].end:
                mine[-1].end = max(mine[-1].start + median, end)
            else:
                end = mine[-1].end
            last_speech = end
        result.append(mine)
    return result, last_speech


class WordAligner:
    """Times the words of finished windows with the alignment graph (`session`: ONNX Runtime or
    OpenVINO, as the decoder's other graphs). `decode(tokens)` is the tokenizer's text with
    special tokens kept (openai-whisper's decode_with_timestamps)."""

    def __init__(self, session, settings, decode: Callable[[list[int]], str]):
        self.session = session
        self.settings = settings
        self.decode = decode

    def sot_sequence(self, language: str | None, task: str) -> list[int]:
        s = self.settings
        tokens = [s.start_token]
        if s.multilingual and language is not None:
            tokens += [s.language_tokens[language], s.task_tokens[task]]
        return tokens

    def words(
        self,
        hidden: np.ndarray,
        segments: list[TimedSegment],
        language: str | None,
        task: str,
        frames: int,
        offset_s: float,
        last_speech: float = 0.0,
    ) -> tuple[list[list[Word]], float]:
        """Each segment's words on the file's timeline (`segments`' times already on it; `hidden`:
        the window's encoder output [frames_out, d]; `frames`: the window's mel frames of audio),
        and the end of the last speech (faster-whisper's last_speech_timestamp, carried from one
        window of a file to the next)."""
        s = self.settings
        # text tokens: ids below the end token (timestamps and the other special tokens come after it)
        timed = [TimedSegment(seg.start, seg.end, [t for t in seg.tokens if t < s.end_token]) for seg in segments]
        text = [t for segment in timed for t in segment.tokens]
        if not text:
            return [[] for _ in segments], last_speech
        prompt = self.sot_sequence(language, task)
        if s.no_timestamps_token is not None:
            prompt.append(s.no_timestamps_token)
        text = text[: s.max_target_positions - len(prompt) - 1]  # the decoder's positions bound one run
        ids = np.array([[*prompt, *text, s.end_token]], dtype=np.int64)
        scores, probs = self.session.run(
            [ALIGNMENT_SCORES, TOKEN_PROBS], {"ENCODER_HIDDEN": hidden[None], "INPUT_IDS": ids}
        )
        found = find_words(scores[0], probs[0], text, len(prompt), frames, s.end_token, self.decode, language)
        return window_words(found, timed, offset_s, last_speech)
