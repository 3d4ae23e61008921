"""In-flight batching for the chat decoders: requests join the running batch between steps.

A `ChatLoop` owns a thread that runs decoding steps over every answer in flight. Requests are
queued (`submit`) by the model's `execute`, which returns at once; before each step the loop
admits what is queued (their prompts prefilled together, left-padded, as `ChatGenerator.prefill`
does for a static batch), joins them to the running rows and answers each row the moment it
finishes, so a short answer never waits for a long one and a finished row's place is taken at
the next step.

The rows' KV cache (`KVSlots`) is preallocated: every layer's keys and values in one tensor of
[rows, heads, columns, head dim]. All rows write their next token in one shared column; a row
that joins has its prompt placed so that it ends at that column, the columns before its prompt
masked. A row that leaves is replaced by the last row (one row copied, never the whole cache);
when the columns run out the ones no row uses any more are dropped, or the tensor grows. The
attention a step computes is the left-padded batch's, so answers are transformers `generate`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tritonkit.chat_decoding import ChatGenerator, ChatOptions, TokenLogprob, cut_at_stop, streamable, token_logprob
from tritonkit.step_loop import BUSY_MARK, CancelledError, QueueFull, StepLoop, wait_all

__all__ = ["BUSY_MARK", "Answer", "CancelledError", "ChatJob", "ChatLoop", "QueueFull", "wait_answers"]
FIRST_COLUMNS = 256  # KV columns allocated at first; doubled when a longer row needs them


@dataclass(eq=False)
class ChatJob:
    """One request's answer to generate, and how to deliver it.

    `on_text(piece)` gets the answer's new text as it becomes final (streaming; may be None),
    `on_done(answer)` the whole answer once, `on_error(exc)` a failure instead. `cancelled()` is
    asked between steps: a client that went away frees its row."""

    features: np.ndarray
    prompt_ids: list[int]
    options: ChatOptions
    on_done: Callable[[Answer], None]
    on_error: Callable[[Exception], None]
    on_text: Callable[[str, Answer], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    grid: np.ndarray | None = None  # Qwen-VL: its images' (t, h, w) patch grids


@dataclass
class Answer:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with ChatOptions.top_logprobs
    text: str = ""
    steps: int = 0
    reason: str = ""  # OpenAI's finish_reason: "stop" (end token, stop string), "length" or "cancelled"
    prompt_tokens: int = 0
    emitted: int = 0  # characters of `text` already given to on_text


class IncrementalText:
    """A row's text, decoding only its new tokens: the last few tokens are decoded again with the
    new one (a word's leading space and multi-token characters depend on what comes before) and
    only the text past them is added; an unfinished UTF-8 sequence waits for its next token."""

    CONTEXT = 6  # tokens decoded again before the new ones

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = 0  # first token of the window decoded again
        self.read = 0  # tokens whose text is in `text`
        self.text = ""

    def add(self, tokens: Sequence[int]) -> str:
        """The text of `tokens` (all of the row's tokens so far), the new ones decoded."""
        decode = self.tokenizer.decode
        before = decode(tokens[self.prefix : self.read], skip_special_tokens=True)
        after = decode(tokens[self.prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd") or not after.startswith(before):
            return self.text  # an unfinished character: its next token completes it
        self.text += after[len(before) :]
        self.read = len(tokens)
        self.prefix = max(0, self.read - self.CONTEXT)
        return self.text


def slot_layer_class():
    """`SlotLayer`, made on first use (transformers is imported only where a decoder runs)."""
    global _SLOT_LAYER
    if _SLOT_LAYER is not None:
        return _SLOT_LAYER
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One decoder layer's view of `KVSlots`, as transformers' attention asks its cache layer."""

        is_sliding = False
        is_compileable = False
        is_croppable = False

        def __init__(self, slots: KVSlots, index: int):
            super().__init__()
            self.slots = slots
            self.index = index
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            return self.slots.write(self.index, key_states, value_states)

        def get_seq_length(self) -> int:
            return self.slots.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.slots.length + query_length, 0

        def get_max_length(self) -> int:
            return -1

    _SLOT_LAYER = SlotLayer
    return SlotLayer


_SLOT_LAYER: Any = None


class KVSlots:
    """The KV cache of every row in flight, preallocated (see the module's docstring)."""

    def __init__(self, torch_module, device: str = "cpu"):
        self.torch = torch_module
        self.device = device
        self.keys: list[Any] = []  # per layer [capacity, heads, columns, head dim]
        self.values: list[Any] = []
        self.mask: Any = None  # [capacity, columns] 1 where a row has a token
        self.starts: list[int] = []  # per row: its first column
        self.rows = 0
        self.length = 0  # columns written (the next step writes column `length`)

    @property
    def capacity(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def cache(self):
        """A transformers Cache over these slots, for one forward call of the rows in flight."""
        from transformers.cache_utils import Cache

        layer = slot_layer_class()
        return Cache(layers=[layer(self, i) for i in range(len(self.keys))])

    def write(self, layer: int, key_states, value_states):
        """A step's keys and values (one column per row) written in place; the keys and values to attend to."""
        q = key_states.shape[-2]
        end = self.length + q
        self.keys[layer][: self.rows, :, self.length : end] = key_states
        self.values[layer][: self.rows, :, self.length : end] = value_states
        return self.keys[layer][: self.rows, :, :end], self.values[layer][: self.rows, :, :end]

    def step_mask(self):
        """The attention mask of the next step (its column made valid for every row)."""
        self.room(1)
        self.mask[: self.rows, self.length] = 1
        return self.mask[: self.rows, : self.length + 1]

    def advance(self) -> None:
        self.length += 1

    def admit(self, prefill_cache, lengths: Sequence[int], sources: Sequence[int] | None = None) -> None:
        """Rows prefilled together (left-padded to the longest, `lengths` their own) joined to the
        rows in flight, each ending at the shared column; row j's keys and values are the prefill's
        row `sources[j]` (rows of one prompt share one prefill row)."""
        layers = [(layer.keys, layer.values) for layer in prefill_cache.layers]
        count, padded = len(lengths), layers[0][0].shape[-2]
        if not self.keys:
            heads, head_dim = layers[0][0].shape[1], layers[0][0].shape[-1]
            self._allocate(
                max(count, 4), max(FIRST_COLUMNS, padded + 1), heads, head_dim, layers[0][0].dtype, len(layers)
            )
        longest = max(lengths)
        if longest > self.length:  # the rows in flight move right to make room for the longest prompt
            self.room(longest - self.length + 1)
            shift = longest - self.length
            if self.rows and shift:
                for tensor in (*self.keys, *self.values):
                    tensor[: self.rows, :, shift : shift + self.length] = tensor[: self.rows, :, : self.length].clone()
                self.mask[: self.rows, shift : shift + self.length] = self.mask[: self.rows, : self.length].clone()
                self.mask[: self.rows, :shift] = 0
                self.starts = [s + shift for s in self.starts]
            self.length = longest
        self.room(1)
        if self.rows + count > self.capacity:
            self._grow(rows=max(self.rows + count, 2 * self.capacity))
        for j, length in enumerate(lengths):
            row, source = self.rows + j, j if sources is None else sources[j]
            for layer, (keys, values) in enumerate(layers):
                self.keys[layer][row, :, self.length - length : self.length] = keys[source, :, padded - length :]
                self.values[layer][row, :, self.length - length : self.length] = values[source, :, padded - length :]
            self.mask[row] = 0
            self.mask[row, self.length - length : self.length] = 1
            self.starts.append(self.length - length)
        self.rows += count

    def remove(self, row: int) -> None:
        """Row `row` leaves; the last row takes its place (the caller moves its own row state likewise)."""
        last = self.rows - 1
        if row != last:
            for tensor in (*self.keys, *self.values):
                tensor[row, :, : self.length] = tensor[last, :, : self.length]
            self.mask[row, : self.length] = self.mask[last, : self.length]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        self.rows = last
        if not self.rows:
            self.length = 0

    def room(self, needed: int) -> None:
        """At least `needed` free columns after `length`: drop the columns no row uses, or grow."""
        if self.length + needed <= self.columns:
            return
        first = min(self.starts) if self.starts else self.length
        if first:
            for tensor in (*self.keys, *self.values):
                tensor[: self.rows, :, : self.length - first] = tensor[: self.rows, :, first : self.length].clone()
            self.mask[: self.rows, : self.length - first] = self.mask[: self.rows, first : self.length].clone()
            self.mask[: self.rows, self.length - first :] = 0
            self.starts = [s - first for s in self.starts]
            self.length -= first
        if self.length + needed > self.columns:
            self._grow(columns=max(self.length + needed, 2 * self.columns))

    def _allocate(self, rows: int, columns: int, heads: int, head_dim: int, dtype, layers: int) -> None:
        torch = self.torch
        shape = (rows, heads, columns, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.mask = torch.zeros((rows, columns), dtype=torch.long, device=self.device)

    def _grow(self, rows: int | None = None, columns: int | None = None) -> None:
        rows, columns = rows or self.capacity, columns or self.columns
        old_keys, old_values, old_mask = self.keys, self.values, self.mask
        heads, _, head_dim = old_keys[0].shape[1:]
        self._allocate(rows, columns, heads, head_dim, old_keys[0].dtype, len(old_keys))
        for new, old in zip((*self.keys, *self.values), (*old_keys, *old_values)):
            new[: self.rows, :, : self.length] = old[: self.rows, :, : self.length]
        self.mask[: self.rows, : self.length] = old_mask[: self.rows, : self.length]


@dataclass
class _Row:
    job: ChatJob
    answer: Answer
    text: IncrementalText
    position: Any  # the position of its next token: [1] or M-RoPE's [4] (a tensor)
    limit: int
    generator: Any
    last: int = 0  # the token fed at the next step
    matcher: Any = None  # structured outputs: the grammar's state (llguidance), None for a free row


class ChatLoop(StepLoop[ChatJob, ChatJob]):
    """The step loop of one model instance (see the module's docstring). `max_rows` answers are
    generated at once; up to `max_queued` more wait; past that `submit` raises QueueFull."""

    name = "tritonkit-chat-loop"

    def __init__(
        self,
        generator: ChatGenerator,
        default_max_new_tokens: int,
        max_rows: int = 32,
        max_queued: int = 128,
        on_rows: Callable[[int, int], None] | None = None,
        cancel_check_s: float = 0.1,
    ):
        import inspect

        import torch

        super().__init__(max_rows, max_queued, on_rows, cancel_check_s)
        self.torch = torch
        self.generator = generator
        self.default_max_new_tokens = default_max_new_tokens
        parameters = inspect.signature(generator.lm.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.slots = KVSlots(torch, generator.device)
        self.rows: list[_Row] = []
        self.start()

    @property
    def running(self) -> int:
        return len(self.rows)

    def _taken(self, job: ChatJob) -> ChatJob:
        return job

    def _step_all(self) -> None:
        self._step()

    def _drop_cancelled(self) -> None:
        for index in reversed(range(len(self.rows))):
            row = self.rows[index]
            if row.job.cancelled():
                row.answer.reason = "cancelled"
                self._leave(index)
                row.job.on_error(CancelledError("the request was cancelled"))

    def _admit(self, jobs: list[ChatJob]) -> None:
        """Prefill the newcomers together and join them; one whose prefill fails alone fails alone."""
        live = []
        for job in jobs:
            if job.cancelled():
                job.on_error(CancelledError("the request was cancelled"))
            else:
                live.append(job)
        if not live:
            return
        distinct, sources = shared_prompts(live)
        try:
            cache, logits, positions = self.generator.prefill(
                [job.features for job in distinct],
                [job.prompt_ids for job in distinct],
                [job.grid for job in distinct] if distinct[0].grid is not None else None,
            )
        except Exception as exc:
            if len(live) == 1:
                live[0].on_error(exc)
                return
            for job in live:  # the culprit fails alone, with its own error
                self._admit([job])
            return
        self.slots.admit(cache, [len(job.prompt_ids) for job in live], sources)
        del cache
        if len(distinct) < len(live):  # choices of one prompt (OpenAI's n) start from its one prefill
            index = self.torch.tensor(sources, device=logits.device)
            logits = logits[index]
            positions = positions[:, index] if positions.dim() == 3 else positions[index]
        torch = self.torch
        for j, job in enumerate(live):
            generator = torch.Generator().manual_seed(int(job.options.seed)) if job.options.seed is not None else None
            answer = Answer(prompt_tokens=len(job.prompt_ids))
            row = _Row(
                job,
                answer,
                IncrementalText(self.generator.tokenizer),
                positions[..., j, :] if positions.dim() == 3 else positions[j],
                job.options.max_new_tokens or self.default_max_new_tokens,
                generator,
                matcher=self.generator.matcher(job.options.grammar) if job.options.grammar else None,
            )
            self.rows.append(row)
        self._choose(logits, range(len(self.rows) - len(live), len(self.rows)))
        self._report()

    def _step(self) -> None:
        torch = self.torch
        mask = self.slots.step_mask()
        ids = torch.tensor([[row.last] for row in self.rows], dtype=torch.long, device=self.generator.device)
        positions = torch.stack([row.position for row in self.rows], dim=-2)  # [n, 1] or [4, n, 1]
        with torch.no_grad():
            output = self.generator.lm(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_argument: self.slots.cache()},
            )
        self.slots.advance()
        for row in self.rows:
            row.position = row.position + 1
        self.steps += 1
        self._choose(output.logits[:, -1, :].float(), range(len(self.rows)))

    def _choose(self, logits, indices) -> None:
        """Each row's next token; rows that finish are answered and leave."""
        finished = []
        indices = list(indices)
        matchers = [self.rows[index].matcher for index in indices]
        raw = {}  # logprobs are the model's own, before a grammar's mask
        if any(m is not None for m in matchers):
            for j, index in enumerate(indices):
                if matchers[j] is not None and self.rows[index].job.options.top_logprobs is not None:
                    raw[j] = logits[j].clone()
            self.generator.constrain(logits, matchers)
        # one call for every row, numpy's on CPU (torch's argmax took 1.8 ms for 16 rows, numpy's 0.15)
        greedy = (logits.argmax(dim=-1) if logits.is_cuda else logits.numpy().argmax(axis=1)).tolist()
        for j, (index, row_logits, best) in enumerate(zip(indices, logits, greedy)):
            row = self.rows[index]
            options = row.job.options
            token = (
                int(best) if options.temperature == 0 else self.generator._choose(row_logits, options, row.generator)
            )
            row.answer.steps += 1
            row.last = token
            done = False
            if token in self.generator.eos:
                row.answer.reason, done = "stop", True
            else:
                row.answer.tokens.append(token)
                if options.top_logprobs is not None:
                    row.answer.logprobs.append(token_logprob(raw.get(j, row_logits), token, options.top_logprobs))
                text = row.text.add(row.answer.tokens)
                row.answer.text, stopped = cut_at_stop(text, options.stop) if options.stop else (text, False)
                if row.matcher is not None:
                    row.matcher.consume_token(token)
                    stopped = stopped or row.matcher.is_stopped()  # the grammar is complete: nothing may follow
                if stopped or len(row.answer.tokens) >= row.limit:
                    row.answer.reason, done = ("stop" if stopped else "length"), True
            if done:
                finished.append(index)
            elif row.job.on_text is not None:
                end = streamable(row.answer.text, options.stop)
                if end > row.answer.emitted:
                    row.job.on_text(row.answer.text[row.answer.emitted : end], row.answer)
                    row.answer.emitted = end
        for index in sorted(finished, reverse=True):
            row = self.rows[index]
            if row.answer.reason != "stop" or row.answer.tokens:  # the full text, the last token included
                row.answer.text = cut_at_stop(
                    self.generator.tokenizer.decode(row.answer.tokens, skip_special_tokens=True), row.job.options.stop
                )[0]
            self._leave(index)
            on_text = row.job.on_text
            if on_text is not None and len(row.answer.text) > row.answer.emitted:
                self._deliver(functools.partial(on_text, row.answer.text[row.answer.emitted :]), row.answer)
                row.answer.emitted = len(row.answer.text)
            self._deliver(row.job.on_done, row.answer)

    def _leave(self, index: int) -> None:
        self.slots.remove(index)
        last = self.rows.pop()
        if index < len(self.rows):
            self.rows[index] = last
        self._report()

    def _fail_all(self, exc: Exception, waiting: Sequence[ChatJob] = ()) -> None:
        rows, self.rows = self.rows, []
        self.slots = KVSlots(self.torch, self.generator.device)
        for job in [*(row.job for row in rows), *waiting]:
            self._deliver(job.on_error, exc)


def shared_prompts(jobs: Sequence[ChatJob]) -> tuple[list[ChatJob], list[int]]:
    """The jobs' distinct prompts (the same ids, image features and grids: OpenAI's `n` choices of
    one request), and for each job the index of its prompt among them."""
    distinct: list[ChatJob] = []
    sources = []
    for job in jobs:
        for k, other in enumerate(distinct):
            if (
                job.prompt_ids == other.prompt_ids
                and job.features.shape == other.features.shape
                and np.array_equal(job.features, other.features)
                and same_grid(job.grid, other.grid)
            ):
                sources.append(k)
                break
        else:
            sources.append(len(distinct))
            distinct.append(job)
    return distinct, sources


def same_grid(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def wait_answers(
    loop: ChatLoop, jobs: Sequence[dict], timeout_s: float = 600, together: bool = False
) -> list[Answer | Exception]:
    """Submit jobs (ChatJob fields without the callbacks) and wait for all their answers: the
    loop used in process (tests, benchmarks). `together`: as one request's rows, taken in one turn."""
    pending: list[ChatJob] = []

    def submit(fields, on_done, on_error):
        job = ChatJob(on_done=on_done, on_error=on_error, **fields)
        if not together:
            loop.submit(job)
            return
        pending.append(job)
        if len(pending) == len(jobs):
            loop.submit_all(pending)

    return wait_all(submit, jobs, timeout_s)
