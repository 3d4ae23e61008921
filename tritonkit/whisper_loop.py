"""In-flight batching for Whisper: windows join the running decoder batch between steps.

A `WhisperLoop` owns a thread that runs decoder steps over every window in flight. Windows are
queued (`submit`) by the decoder model's `execute`, which returns at once; before each step the
loop admits what is queued: their cross-attention keys and values are computed, languages
detected, and their prompts prefilled together (left-padded), then they join the running rows.
A window leaves the moment its end token comes, and its request is answered as soon as all its
windows are final, so a short clip never waits for a long file's windows.

Rows that began at different steps share one self-attention cache: the decoder step graph takes
each row's left padding (OFFSETS), positions its tokens from its own first column and masks the
columns before it; the columns no row uses any more are dropped when rows leave. Greedy and
sampled windows run in one lane (a row each); beam search runs in a lane per beam size (a window's
beams together, reading its cross KV once), each lane one decoder step per loop iteration.

A window is decoded exactly as `WindowDecoder.decode` decodes it (the same suppression, timestamp
rules, sampling generator, beam search and OpenAI's temperature fallback, which sends a window
back to the queue at its next temperature); long-form files (`SequentialFile`) feed their next
window as soon as the previous one is final (see the decoder model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tritonkit.step_loop import CancelledError, StepLoop, wait_all
from tritonkit.whisper_decoding import (
    NO_SPEECH_THRESHOLD,
    Beams,
    Cache,
    DecodeOptions,
    WindowDecoder,
    WindowResult,
    compacted,
    log_softmax,
    log_softmax32,
    softmax,
    taken,
    temperature_schedule,
    top_indices,
)

TRIM_COLUMNS = 16  # padding columns every row has before the cache is cut down to drop them


@dataclass(eq=False)
class WindowJob:
    """One window to decode (`hidden`: its encoder output [frames, d_model]) and how to deliver
    it: `on_done(WindowResult)` once final, or `on_error(exc)`. `cancelled()` is asked between steps."""

    hidden: np.ndarray
    options: DecodeOptions
    on_done: Callable[[WindowResult], None]
    on_error: Callable[[Exception], None]
    cancelled: Callable[[], bool] = lambda: False


@dataclass(eq=False)
class _Window:
    """A window's decoding across its attempts (OpenAI's fallback decodes it again)."""

    job: WindowJob
    language: str | None = None
    prompt: list[int] = field(default_factory=list)
    limit: int = 0
    schedule: tuple[float, ...] = (0.0,)
    attempt: int = 0
    no_speech_prob: float = float("nan")
    steps: int = 0
    generator: Any = None

    @property
    def temperature(self) -> float:
        return self.schedule[self.attempt]

    @property
    def group(self) -> int:
        """Its lane: rows a step (1 unless beam search, which runs at temperature 0 only)."""
        o = self.job.options
        return o.beam_size if o.beam_size > 1 and self.temperature == 0 else 1


@dataclass(eq=False)
class _Attempt:
    """One decoding of a window in a lane: greedy or sampled (one row), or beam search."""

    window: _Window
    tokens: list[int] = field(default_factory=list)  # chosen so far (beam search: the best, once done)
    sum_logprob: float = 0.0
    beams: Beams | None = None  # beam search's state

    @property
    def rows(self) -> int:
        """Its live rows (the lane pads a window to its group with copies of the first)."""
        return len(self.beams.live) if self.beams is not None else 1


class _Lane:
    """Rows decoded together: `group` rows a window (its beams), one shared left-padded cache.
    The windows' cross KV lives in a preallocated buffer (the first rows of each tensor are the
    windows in flight, which ONNX Runtime reads in place): windows that join are written after
    them, windows that leave are compacted out in place, so the others are never copied."""

    def __init__(self, group: int, max_windows: int):
        self.group = group
        self.max_windows = max_windows
        self.attempts: list[_Attempt] = []
        self.past: Cache = {}
        self.cross: Cache = {}  # views of the first len(attempts) rows of `_cross_buffer`
        self._cross_buffer: Cache = {}
        self.offsets = np.zeros((0, 1), dtype=np.int64)
        self.ids = np.zeros((0, 1), dtype=np.int64)

    @property
    def length(self) -> int:
        return next(iter(self.past.values())).shape[2] if self.past else 0

    def join(self, past: Cache, cross: Cache, offsets: np.ndarray, ids: np.ndarray, attempts) -> None:
        """Rows prefilled apart (their cache `past`, left-padded among themselves) joined to the
        lane's: whichever is shorter is padded on the left to the other's columns."""
        self._add_cross(cross)
        if not self.attempts:
            self.past, self.offsets, self.ids = past, offsets, ids
            self.attempts = list(attempts)
            return
        theirs = next(iter(past.values())).shape[2]
        ours = self.length
        if theirs < ours:
            past, offsets = _padded(past, ours - theirs), offsets + (ours - theirs)
        elif ours < theirs:
            self.past, self.offsets = _padded(self.past, theirs - ours), self.offsets + (theirs - ours)
        self.past = {name: np.concatenate([self.past[name], past[name]]) for name in self.past}
        self.offsets = np.concatenate([self.offsets, offsets])
        self.ids = np.concatenate([self.ids, ids])
        self.attempts += attempts

    def _add_cross(self, cross: Cache) -> None:
        count, added = len(self.attempts), len(next(iter(cross.values())))
        capacity = len(next(iter(self._cross_buffer.values()))) if self._cross_buffer else 0
        if count + added > capacity:  # grown (rarely: to the bound on windows in flight, doubling)
            capacity = max(count + added, min(2 * capacity, self.max_windows))
            buffer = {name: np.empty((capacity, *v.shape[1:]), dtype=v.dtype) for name, v in cross.items()}
            for name, value in self.cross.items():
                buffer[name][:count] = value
            self._cross_buffer = buffer
        for name, value in cross.items():
            self._cross_buffer[name][count : count + added] = value
        self.cross = {name: value[: count + added] for name, value in self._cross_buffer.items()}

    def leave(self, keep_windows: np.ndarray) -> None:
        """Only the windows `keep_windows` (a mask over attempts) stay; padding no row needs is dropped."""
        rows = np.repeat(keep_windows, self.group)
        self.attempts = [a for a, kept in zip(self.attempts, keep_windows) if kept]
        if not self.attempts:  # an idle lane holds no memory
            self.past, self.cross, self._cross_buffer = {}, {}, {}
            self.offsets, self.ids = np.zeros((0, 1), dtype=np.int64), np.zeros((0, 1), dtype=np.int64)
            return
        self.cross = compacted(self.cross, keep_windows)
        self.offsets, self.ids = self.offsets[rows], self.ids[rows]
        cut = int(self.offsets.min())
        if cut >= TRIM_COLUMNS:
            self.past = {name: np.ascontiguousarray(v[rows][:, :, cut:]) for name, v in self.past.items()}
            self.offsets = self.offsets - cut
        else:
            self.past = taken(self.past, rows)


def _padded(cache: Cache, columns: int) -> Cache:
    """Every layer's cache with `columns` zero columns before its first (masked by OFFSETS)."""
    return {name: np.pad(v, ((0, 0), (0, 0), (columns, 0), (0, 0))) for name, v in cache.items()}


class WhisperLoop(StepLoop[WindowJob, _Window]):
    """The step loop of one decoder instance (see the module's docstring). At most `max_rows`
    windows decode at once (a beam-search window counts once: its beams share its cross K/V, the
    memory a window holds); up to `max_queued` more wait, past that `submit` raises QueueFull."""

    name = "tritonkit-whisper-loop"

    def __init__(
        self,
        decoder: WindowDecoder,
        max_rows: int = 16,
        max_queued: int = 64,
        on_rows: Callable[[int, int], None] | None = None,
        cancel_check_s: float = 0.1,
    ):
        super().__init__(max_rows, max_queued, on_rows, cancel_check_s)
        self.decoder = decoder
        self.retries: list[_Window] = []  # windows falling back, admitted again before new ones
        self.lanes: dict[int, _Lane] = {}
        self.start()

    @property
    def running(self) -> int:
        """Windows in flight."""
        return sum(len(lane.attempts) for lane in self.lanes.values())

    windows = running

    def _take(self, taken: list[_Window] | None = None) -> list[_Window]:
        """Fallbacks first, then queued windows."""
        room = self.max_rows - self.running
        first, self.retries = self.retries[:room], self.retries[room:]
        return super()._take(first)

    def _taken(self, job: WindowJob) -> _Window:
        return self._window(job)

    def _step_all(self) -> None:
        for lane in list(self.lanes.values()):
            if lane.attempts:
                self._step(lane)

    def _window(self, job: WindowJob) -> _Window:
        o = job.options
        generator = (
            np.random.default_rng([o.seed & (2**63 - 1), o.window]) if o.seed is not None else np.random.default_rng()
        )
        return _Window(job, schedule=temperature_schedule(o.temperature, o.fallback), generator=generator)

    def _drop_cancelled(self) -> None:
        for lane in self.lanes.values():
            keep = np.array([not a.window.job.cancelled() for a in lane.attempts], dtype=bool)
            if not keep.all():
                gone = [a for a, kept in zip(lane.attempts, keep) if not kept]
                lane.leave(keep)
                for attempt in gone:
                    self._deliver(attempt.window.job.on_error, CancelledError("the request was cancelled"))

    def _admit(self, windows: list[_Window]) -> None:
        """Prefill the newcomers together and join them to their lanes; a window whose admission
        fails alone fails alone."""
        live = []
        for window in windows:
            if window.job.cancelled():
                self._deliver(window.job.on_error, CancelledError("the request was cancelled"))
            elif window.job.options.empty:  # nothing to decode (VAD found no speech)
                self._final(window, [], 0.0, skipped=True)
            else:
                live.append(window)
        if not live:
            return
        try:
            self._prefill(live)
        except Exception as exc:
            if len(live) == 1:
                self._deliver(live[0].job.on_error, exc)
                return
            for window in live:  # the culprit fails alone, with its own error
                self._admit([window])
        self._report()

    def _prefill(self, windows: list[_Window]) -> None:
        d, s = self.decoder, self.decoder.settings
        # computed again for a window that falls back (its encoder output is kept, not its cross KV)
        cross = d._cross_attention(np.stack([w.job.hidden for w in windows]))
        fresh = [j for j, w in enumerate(windows) if not w.prompt]  # first attempts
        # the language (multilingual, none given) and the no-speech probability: first attempt only
        detect = {j for j in fresh if s.multilingual and not windows[j].job.options.language}
        measured = {j for j in fresh if windows[j].job.options.timestamps or windows[j].job.options.fallback}
        asked = sorted(detect | measured)
        if asked:
            logits = d._start_logits(taken(cross, asked))
            codes = list(s.language_tokens)
            token_ids = np.array([s.language_tokens[c] for c in codes]) if codes else None
            for j, row in zip(asked, logits):
                if j in detect and token_ids is not None:
                    windows[j].language = codes[int(row[token_ids].argmax())]
                if j in measured and s.no_timestamps_token is not None:
                    windows[j].no_speech_prob = float(softmax(row[None])[0, s.no_timestamps_token - 1])
        for j in fresh:
            w, o = windows[j], windows[j].job.options
            w.language = "en" if not s.multilingual else (o.language or w.language)
            w.prompt = d.prompt(o, w.language)
            w.limit = min(o.max_new_tokens or s.max_length, s.max_target_positions - len(w.prompt))
        # every newcomer's prompt at once, left-padded to the longest
        longest = max(len(w.prompt) for w in windows)
        ids = np.array([[w.prompt[0]] * (longest - len(w.prompt)) + w.prompt for w in windows], dtype=np.int64)
        offsets = np.array([[longest - len(w.prompt)] for w in windows], dtype=np.int64)
        logits, past = d._run(ids, d._empty_past(len(windows)), cross, offsets)
        for w in windows:
            w.steps += 1
        attempts = [_Attempt(w, beams=Beams.of(w.job.options) if w.group > 1 else None) for w in windows]
        by_lane: dict[int, list[int]] = {}
        for j, w in enumerate(windows):
            by_lane.setdefault(w.group, []).append(j)
        # every choice made before any lane changes: a failure up to here leaves nothing half-admitted
        joins: list[tuple[int, Cache, Cache, np.ndarray, np.ndarray, list[_Attempt]]] = []
        ended: list[_Attempt] = []
        for group, members in by_lane.items():
            chosen = [attempts[j] for j in members]
            rows: list[int] = []  # the prefill rows each continuing row copies (a window's beams: its one row)
            next_ids: list[int] = []
            if group == 1:
                tokens, keep = self._choose_greedy(chosen, logits[members])
                rows = [j for j, kept in zip(members, keep) if kept]
                next_ids = [int(t) for t, kept in zip(tokens, keep) if kept]
            else:
                parents_of, next_of, keep = self._choose_beams(
                    chosen, logits[members], [[k] for k in range(len(members))]
                )
                for mine, tokens_of, kept in zip(parents_of, next_of, keep):
                    if kept:  # padded to the group with copies of the first beam
                        rows += [members[p] for p in mine] + [members[mine[0]]] * (group - len(mine))
                        next_ids += tokens_of + tokens_of[:1] * (group - len(tokens_of))
            ended += [a for a, kept in zip(chosen, keep) if not kept]
            if rows:
                joins.append(
                    (
                        group,
                        taken(past, np.array(rows)),
                        taken(cross, [j for j, kept in zip(members, keep) if kept]),
                        offsets[rows],
                        np.array(next_ids, dtype=np.int64)[:, None],
                        [a for a, kept in zip(chosen, keep) if kept],
                    )
                )
        for group, lane_past, lane_cross, lane_offsets, lane_ids, staying in joins:
            self.lanes.setdefault(group, _Lane(group, self.max_rows)).join(
                lane_past, lane_cross, lane_offsets, lane_ids, staying
            )
        self._finish(ended)

    def _step(self, lane: _Lane) -> None:
        logits, lane.past = self.decoder._run(lane.ids, lane.past, lane.cross, lane.offsets)
        self.steps += 1
        for attempt in lane.attempts:
            attempt.window.steps += attempt.rows
        if lane.group == 1:
            next_ids, keep = self._choose_greedy(lane.attempts, logits)
            lane.ids = next_ids[:, None]
            if not keep.all():
                done = [a for a, k in zip(lane.attempts, keep) if not k]
                lane.leave(keep)
                self._finish(done)
            return
        group = lane.group
        starts = [[k * group + b for b in range(a.rows)] for k, a in enumerate(lane.attempts)]
        parents_of, next_of, keep = self._choose_beams(lane.attempts, logits, starts)
        # each window's rows: its beams' parents, padded to the group with copies of its first
        parents: list[int] = []
        beam_ids: list[int] = []
        for mine, tokens, kept in zip(parents_of, next_of, keep):
            if kept:
                parents += mine + mine[:1] * (group - len(mine))
                beam_ids += tokens + tokens[:1] * (group - len(tokens))
            else:
                parents += [0] * group  # taken, then dropped with its window
                beam_ids += [0] * group
        lane.past = taken(lane.past, np.array(parents, dtype=np.int64))
        lane.ids = np.array(beam_ids, dtype=np.int64)[:, None]
        if not keep.all():
            done = [a for a, k in zip(lane.attempts, keep) if not k]
            lane.leave(keep)
            self._finish(done)

    # -- choosing tokens --------------------------------------------------------------------
    def _choose_greedy(self, attempts: Sequence[_Attempt], logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each attempt's next token (WindowDecoder._decode_rows's choice); which go on."""
        d = self.decoder
        for j, a in enumerate(attempts):
            first = not a.tokens
            logits[j, d.begin_suppress_ids if first else d.suppress_ids] = -np.inf
            if a.window.job.options.timestamps:
                d.apply_timestamp_rules(logits[j], a.tokens, first)
        chosen = logits.argmax(axis=1)
        for j, a in enumerate(attempts):
            temperature = a.window.temperature
            if temperature > 0:
                scaled = logits[j].astype(np.float64) / temperature
                probs = np.exp(scaled - scaled.max())
                cumulative = np.cumsum(probs)
                chosen[j] = int(np.searchsorted(cumulative, a.window.generator.random() * cumulative[-1], side="right"))
        logprobs = log_softmax(logits)[np.arange(len(attempts)), chosen]
        keep = np.ones(len(attempts), dtype=bool)
        for j, (a, token, logprob) in enumerate(zip(attempts, chosen, logprobs)):
            a.sum_logprob += float(logprob)
            if token == d.settings.end_token:
                keep[j] = False
                continue
            a.tokens.append(int(token))
            if len(a.tokens) >= a.window.limit:
                keep[j] = False
        return chosen.astype(np.int64), keep

    def _choose_beams(
        self, attempts: Sequence[_Attempt], logits: np.ndarray, rows_of: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
        """Beam search's step for each window (WindowDecoder._beam_rows's): the rows its next
        beams continue (`rows_of[k]` are window k's live beams' rows in `logits`) and their
        tokens; which windows go on."""
        d = self.decoder
        logprobs = log_softmax32(logits)  # the processors mask log-probabilities (float32, as transformers)
        for a, rows in zip(attempts, rows_of):
            assert a.beams is not None
            first = not a.beams.live[0][1]
            logprobs[np.array(rows)[:, None], d.begin_suppress_ids if first else d.suppress_ids] = -np.inf
            if a.window.job.options.timestamps:
                for row, (_, tokens) in zip(rows, a.beams.live):
                    d.apply_timestamp_rules(logprobs[row], tokens, not tokens)
        best_tokens = top_indices(logprobs, 2 * max(a.window.job.options.beam_size for a in attempts))
        parents_of: list[list[int]] = []
        next_of: list[list[int]] = []
        keep = np.ones(len(attempts), dtype=bool)
        for k, (a, rows) in enumerate(zip(attempts, rows_of)):
            assert a.beams is not None
            running = a.beams.advance(logprobs[rows], best_tokens[rows], d.settings.end_token, a.window.limit)
            parents_of.append([rows[beam] for beam, _ in running])
            next_of.append([token for _, token in running])
            if not running:
                keep[k] = False
                a.sum_logprob, a.tokens = a.beams.best()
        return parents_of, next_of, keep

    # -- answering ----------------------------------------------------------------------------
    def _finish(self, attempts: Sequence[_Attempt]) -> None:
        """Attempts that ended: OpenAI's fallback judges each; the final ones are delivered."""
        for a in attempts:
            w = a.window
            o = w.job.options
            if o.fallback:
                too_unlikely, too_repetitive = self.decoder.judge(a.sum_logprob, a.tokens)
                silent = w.no_speech_prob > NO_SPEECH_THRESHOLD
                if (too_unlikely or too_repetitive) and not silent and w.attempt + 1 < len(w.schedule):
                    w.attempt += 1
                    self.retries.append(w)
                    continue
                self._final(w, a.tokens, a.sum_logprob, skipped=silent and too_unlikely)
            else:
                self._final(w, a.tokens, a.sum_logprob)

    def _final(self, w: _Window, tokens, sum_logprob, skipped=False) -> None:
        result = WindowResult(list(tokens), w.language, w.steps, sum_logprob, w.no_speech_prob, w.temperature, skipped)
        self._deliver(w.job.on_done, result)

    def _fail_all(self, exc: Exception, waiting: Sequence[_Window] = ()) -> None:
        jobs = [a.window.job for lane in self.lanes.values() for a in lane.attempts]
        jobs += [w.job for w in (*waiting, *self.retries)] + list(self.continuing)
        self.lanes, self.retries = {}, []
        self.continuing.clear()
        for job in jobs:
            self._deliver(job.on_error, exc)


def wait_windows(loop: WhisperLoop, jobs: Sequence[dict], timeout_s: float = 600) -> list[WindowResult | Exception]:
    """Submit windows (WindowJob fields without the callbacks) and wait for all: the loop used in
    process (tests, benchmarks)."""

    def submit(fields, on_done, on_error):
        loop.submit(WindowJob(on_done=on_done, on_error=on_error, **fields))

    return wait_all(submit, jobs, timeout_s)
