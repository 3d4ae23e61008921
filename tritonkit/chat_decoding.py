"""LLaVA's text generation, as the served decoder runs it: a whole dynamic batch at once.

Each request's prompt (one question, or a whole conversation in MESSAGES) goes through the
model's chat template; its `<image>` token becomes one
token per image feature, and the embeddings of those tokens are replaced by the features (what
`LlavaForConditionalGeneration` does). Prompts of a batch are left-padded and decoded together
with the language model's KV cache: greedy by default, or sampling (temperature, top-p) from a
per-request generator seeded with SEED, so a seeded request gives the same text whatever it was
batched with. A request stops at an end token, at `max_new_tokens`, or when its text contains
one of its stop strings (the text is cut before it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tritonkit.contracts import RESPONSE_FORMAT
from tritonkit.errors import InputError

MAX_STOP_STRINGS = 16
# OpenAI's logprobs: TOP_LOGPROBS in (absent: none; 0: each token's own; up to 20 alternatives),
# LOGPROBS out (JSON: OpenAI's `logprobs.content` list for the tokens of that response).
MAX_TOP_LOGPROBS = 20
# Structured outputs: RESPONSE_FORMAT, OpenAI's `response_format` object as JSON; json_object and
# json_schema constrain each step to the tokens the schema allows (llguidance).
MAX_RESPONSE_FORMAT_BYTES = 64 * 1024
DEFAULT_MAX_PROMPT_BYTES = 64 * 1024  # checked before tokenizing; the token count is checked after
MAX_STOP_CHARS = 256
# Sampling temperatures: below the floor the logits divided by it overflow float32 (1e-40 gave
# inf and NaN probabilities), so such a temperature decodes greedily, as vLLM treats them; the
# ceiling is OpenAI's.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class ChatOptions:
    max_new_tokens: int | None = None
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k likeliest
    grammar: str | None = None  # an llguidance grammar (`response_grammar`): the answer must match it

    def validate(self, limit: int) -> ChatOptions:
        """These options checked against the decoder's limits; a temperature below MIN_TEMPERATURE is greedy."""
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= limit:
            raise InputError(
                f"MAX_NEW_TOKENS: must be between 1 and {limit}, got {self.max_new_tokens}", reason="bad_option"
            )
        if not np.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InputError(
                f"TEMPERATURE: must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {self.temperature:g}",
                reason="bad_option",
            )
        if not np.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"TOP_P: must be in (0, 1], got {self.top_p:g}", reason="bad_option")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InputError(
                f"STOP: up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters",
                reason="bad_option",
            )
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(
                f"TOP_LOGPROBS: must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}", reason="bad_option"
            )
        if 0 < self.temperature < MIN_TEMPERATURE:
            return replace(self, temperature=0.0)
        return self


def response_grammar(raw: str, tensor: str = RESPONSE_FORMAT) -> str | None:
    """OpenAI's `response_format` (JSON) as the llguidance grammar that constrains the answer:
    None for `text`; any JSON object for `json_object`; for `json_schema`, its `schema` (strict or
    not, every answer matches it). JSON is written compactly unless the schema's own `x-guidance`
    says otherwise, so a model cannot spend its tokens on whitespace. InputError names what is
    wrong, a schema the library cannot use included."""
    if len(raw) > MAX_RESPONSE_FORMAT_BYTES:
        raise InputError(f"{tensor}: {len(raw)} bytes exceeds {MAX_RESPONSE_FORMAT_BYTES}", reason="too_long")
    try:
        response_format = json.loads(raw)
    except ValueError:
        raise InputError(f"{tensor}: not JSON; send OpenAI's response_format object", reason="bad_option") from None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    schema: dict
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        described = response_format.get("json_schema")
        given = described.get("schema", {}) if isinstance(described, dict) else None
        if not isinstance(given, dict):
            raise InputError(f"{tensor}: json_schema.schema must be a JSON schema object", reason="bad_option")
        schema = given
    else:
        raise InputError(f"{tensor}: type must be text, json_object or json_schema", reason="bad_option")
    import llguidance

    schema = {"x-guidance": {"whitespace_flexible": False}, **schema}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        name = (response_format.get("json_schema") or {}).get("name", "the schema")
        raise InputError(f"{tensor}: {name} cannot constrain decoding: {problem}", reason="bad_option")
    return grammar


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (the log-softmax of its logits, before
    temperature and top-p, as OpenAI and vLLM report them) and the `top` likeliest tokens'."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits, token: int, top: int) -> TokenLogprob:
    """`token`'s entry from one row's logits (a float32 torch vector)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(top)
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)


def logprobs_json(tokenizer, entries: Sequence[TokenLogprob]) -> str:
    """Entries as OpenAI's `choices[].logprobs.content`: each token's text, logprob, UTF-8 bytes
    and its top alternatives likewise."""

    def described(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return json.dumps(
        [{**described(e.token, e.logprob), "top_logprobs": [described(t, lp) for t, lp in e.top]} for e in entries]
    )


@dataclass
class Generated:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with ChatOptions.top_logprobs
    text: str = ""
    steps: int = 0
    finished: bool = False
    emitted: int = 0  # characters of `text` already streamed
    reason: str = ""  # why it ended, as OpenAI's finish_reason: "stop" (end token, stop string) or "length"


ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256


def chat_prompt(processor, prompt: str, images: int = 1) -> str:
    """The model's chat template around the image(s) and the user's prompt, ready for generation."""
    parts = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    return chat_text(processor, [{"role": "user", "content": parts}])


def chat_text(processor, messages: list[dict]) -> str:
    """A checked conversation (see `conversation`) in the model's chat template, ready for generation."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def conversation(raw: str, tensor: str = "MESSAGES", images: int = 1, placeholder: str = "<image>") -> list[dict]:
    """MESSAGES parsed and checked: a JSON list of {"role": system|user|assistant, "content": text or
    parts}, parts {"type": "text", "text": ...} or {"type": "image"} (one per image the request
    sends, in order; `placeholder` is the model's image token, which text may not contain).
    Contents come back as lists of parts, the form every chat template reads."""
    try:
        messages = json.loads(raw)
    except ValueError:
        raise InputError(f"{tensor}: not JSON; send a list of {{role, content}} messages", reason="bad_text") from None
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise InputError(f"{tensor}: a list of 1 to {MAX_MESSAGES} {{role, content}} messages", reason="bad_text")
    checked, found = [], 0
    for k, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InputError(f"{tensor}[{k}].role: one of {', '.join(ROLES)}", reason="bad_text")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise InputError(f"{tensor}[{k}].content: a string or a list of parts", reason="bad_text")
        kept: list[dict] = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if placeholder in part["text"]:
                    raise InputError(
                        f"{tensor}[{k}].content[{j}]: do not write {placeholder}; use an {{type: image}} part",
                        reason="bad_text",
                    )
                kept.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                found += 1
                kept.append({"type": "image"})
            else:
                raise InputError(
                    f"{tensor}[{k}].content[{j}]: a {{type: text, text}} or {{type: image}} part", reason="bad_text"
                )
        checked.append({"role": role, "content": kept})
    if found != images:
        wanted = (
            "exactly one {type: image} part (it stands for IMAGE)"
            if images == 1
            else "no {type: image} part: this turn sends no image (send IMAGE through NAME_chat)"
            if images == 0
            else f"{images} {{type: image}} parts (one per image sent)"
        )
        raise InputError(f"{tensor}: {wanted}, got {found}", reason="bad_text")
    return checked


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stop if s in text]
    return (text[: min(positions)], True) if positions else (text, False)


def streamable(text: str, stop: Sequence[str]) -> int:
    """How much of `text` can be streamed now: not a trailing partial character (U+FFFD from an
    unfinished UTF-8 sequence), nor an end that may turn out to begin a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold


class ChatGenerator:
    def __init__(
        self,
        lm,
        tokenizer,
        image_token_id: int,
        eos_token_ids: Sequence[int],
        device: str = "cpu",
        mrope_merge_size: int | None = None,
    ):
        """`mrope_merge_size`: the model places image tokens with multimodal rotary positions
        (Qwen-VL's M-RoPE, `tritonkit.qwen_vl.mrope_positions`) for patch grids merged by that size;
        None: positions count tokens (LLaVA)."""
        import torch

        self.context_length = int(getattr(lm.config, "max_position_embeddings", 0) or 0)  # 0: unknown
        self.torch = torch
        self.lm = lm
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.eos = set(int(e) for e in eos_token_ids)
        self.device = device
        self.embed = lm.get_input_embeddings()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self.mrope_merge_size = mrope_merge_size
        self.vocab_size = int(getattr(lm.config, "vocab_size", 0) or len(tokenizer))  # the logits' width
        self._grammar_tokenizer: Any = None  # llguidance's view of the tokenizer, made on first use
        self._grammar_executor: Any = None

    def matcher(self, grammar: str):
        """An llguidance matcher of `grammar` over this model's vocabulary (made on first use)."""
        import llguidance
        import llguidance.hf

        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            self._grammar_executor = llguidance.LLExecutor()
        return llguidance.LLMatcher(self._grammar_tokenizer, grammar)

    def constrain(self, logits, matchers: Sequence) -> None:
        """Each row's logits masked in place to what its matcher allows (None: a free row); the
        masks of all constrained rows are computed at once, in parallel."""
        import llguidance.numpy  # not llguidance.torch: importing it compiles a kernel (see apply_bitmask)

        constrained = [(matcher, row) for row, matcher in enumerate(matchers) if matcher is not None]
        if not constrained:
            return
        bitmask = llguidance.numpy.allocate_token_bitmask(len(constrained), logits.shape[-1])
        masks = [(matcher, k) for k, (matcher, _) in enumerate(constrained)]
        llguidance.numpy.fill_next_token_bitmask_par(self._grammar_executor, masks, bitmask)
        for k, (_, row) in enumerate(constrained):  # the free rows' logits are left alone
            apply_bitmask(logits[row], bitmask[k])

    def prompt_ids(self, prompt_text: str, image_tokens: int | Sequence[int]) -> list[int]:
        """Token ids of a chat-templated prompt with each image's placeholder token expanded to one
        token per feature of that image (`image_tokens`: the count, or one count per image in
        order), tokenized as the model's processor tokenizes (with its special tokens, e.g. BOS)."""
        counts = [image_tokens] if isinstance(image_tokens, int) else list(image_tokens)
        ids = self.tokenizer(prompt_text)["input_ids"]
        placed = ids.count(self.image_token_id)
        if placed != len(counts):
            token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            raise InputError(
                f"PROMPT: the chat template placed {placed} image tokens for {len(counts)} image(s); "
                f"do not write {token} yourself",
                reason="bad_text",
            )
        expanded: list[int] = []
        images = iter(counts)
        for token_id in ids:
            expanded.extend([token_id] * next(images) if token_id == self.image_token_id else [token_id])
        return expanded

    def fit(self, ids: list[int], image_tokens: int, options: ChatOptions, default_max_new_tokens: int) -> ChatOptions:
        """The options with MAX_NEW_TOKENS fitted into the context: an explicit one must fit whole
        beside the prompt; the default is cut to what is left. InputError when nothing fits."""
        if not self.context_length:
            return options
        left = self.context_length - len(ids)
        wanted = options.max_new_tokens or default_max_new_tokens
        if (options.max_new_tokens is not None and wanted > left) or left < 1:
            raise InputError(
                f"PROMPT: {len(ids) - image_tokens} prompt tokens + {image_tokens} image tokens + "
                f"{wanted if options.max_new_tokens is not None else 1} new tokens exceed the model's "
                f"{self.context_length}-token context; shorten the prompt"
                + (" or lower MAX_NEW_TOKENS" if options.max_new_tokens is not None else ""),
                reason="too_long",
            )
        return replace(options, max_new_tokens=min(wanted, left))

    def generate(
        self,
        features: Sequence[np.ndarray],
        prompts: Sequence[list[int]],
        options: Sequence[ChatOptions],
        default_max_new_tokens: int,
        on_text: Callable[[int, str, Generated], None] | None = None,
        grids: Sequence[np.ndarray] | None = None,
    ) -> list[Generated]:
        """Decode every row together. `on_text(row, piece, result)` streams each row's new text;
        `grids`: per row its images' (t, h, w) patch grids (M-RoPE models)."""
        torch = self.torch
        count = len(prompts)
        with torch.no_grad():
            cache, logits, next_position = self.prefill(features, prompts, grids)
            mask = torch.zeros((count, max(len(p) for p in prompts)), dtype=torch.long, device=self.device)
            for i, prompt in enumerate(prompts):
                mask[i, mask.shape[1] - len(prompt) :] = 1
            generators = [torch.Generator().manual_seed(int(o.seed)) if o.seed is not None else None for o in options]
            limits = [o.max_new_tokens or default_max_new_tokens for o in options]
            results = [Generated() for _ in range(count)]
            while True:
                chosen = []
                for i, (row_logits, result) in enumerate(zip(logits, results)):
                    if result.finished:
                        chosen.append(self.pad_id)
                        continue
                    token = self._choose(row_logits, options[i], generators[i])
                    chosen.append(token)
                    result.steps += 1
                    if token in self.eos:
                        result.finished, result.reason = True, "stop"
                    else:
                        result.tokens.append(token)
                        top = options[i].top_logprobs
                        if top is not None:
                            result.logprobs.append(token_logprob(row_logits, token, top))
                        text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
                        result.text, stopped = cut_at_stop(text, options[i].stop)
                        if stopped or len(result.tokens) >= limits[i]:
                            result.finished, result.reason = True, "stop" if stopped else "length"
                    if on_text is not None:
                        end = len(result.text) if result.finished else streamable(result.text, options[i].stop)
                        if end > result.emitted:
                            on_text(i, result.text[result.emitted : end], result)
                            result.emitted = end
                if all(r.finished for r in results):
                    return results
                step_ids = torch.tensor(chosen, dtype=torch.long, device=self.device)[:, None]
                mask = torch.cat([mask, torch.ones((count, 1), dtype=mask.dtype, device=self.device)], dim=1)
                output = self.lm(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=next_position,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = output.past_key_values
                logits = output.logits[:, -1, :].float()
                next_position = next_position + 1

    def prefill(self, features: Sequence[np.ndarray], prompts: Sequence[list[int]], grids=None):
        """The prompts run together, left-padded, each image's features in place of its tokens:
        (the KV cache, the last position's logits [rows, vocab] as float32, each row's next
        position: [rows, 1], or [4, rows, 1] with M-RoPE)."""
        torch = self.torch
        count = len(prompts)
        longest = max(len(p) for p in prompts)
        ids = torch.full((count, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((count, longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt) :] = torch.tensor(prompt)
            mask[i, longest - len(prompt) :] = 1
        with torch.no_grad():
            embeds = self.embed(ids.to(self.device))
            for i, feature in enumerate(features):
                positions = (ids[i] == self.image_token_id).nonzero().flatten()
                embeds[i, positions] = torch.from_numpy(np.asarray(feature)).to(embeds.dtype).to(self.device)
            position_ids, next_position = self.prompt_positions(ids, mask, prompts, grids)
            mask, position_ids, next_position = (t.to(self.device) for t in (mask, position_ids, next_position))
            # the last position's logits only: a whole prompt's would cost a vocabulary-wide product a token
            output = self.lm(
                inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1
            )
        return output.past_key_values, output.logits[:, -1, :].float(), next_position

    def prompt_positions(self, ids, mask, prompts: Sequence[list[int]], grids):
        """Position ids of the left-padded prompts and of each row's first new token (then +1 a
        step): token counts [B, L] and [B, 1]; with M-RoPE [4, B, L] and [4, B, 1] (text positions,
        as transformers' generate passes them, then temporal, height, width)."""
        torch = self.torch
        text = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.mrope_merge_size is None:
            return text, text[:, -1:] + 1
        from tritonkit.qwen_vl import mrope_positions

        count, longest = ids.shape
        rope = torch.zeros((3, count, longest), dtype=torch.long)
        following = torch.zeros((4, count, 1), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            positions, delta = mrope_positions(prompt, self.image_token_id, grids[i], self.mrope_merge_size)
            rope[:, i, longest - len(prompt) :] = torch.from_numpy(positions)
            following[0, i], following[1:, i] = len(prompt), len(prompt) + delta
        return torch.cat([text[None], rope]), following

    def _choose(self, logits, options: ChatOptions, generator) -> int:
        torch = self.torch
        if options.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.cpu().double() / options.temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # logits that were already inf or NaN: nothing to sample from
            return int(logits.nan_to_num(nan=float("-inf")).argmax())
        if options.top_p < 1:
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < options.top_p  # the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator))


def apply_bitmask(logits, bitmask: np.ndarray) -> None:
    """One row's logits [vocab] set to -inf where its packed bitmask [vocab / 32] (int32, bit i of
    word w allows token 32w + i, llguidance's layout) forbids. numpy and plain tensor operations:
    llguidance.torch's kernel is torch.compile'd at import, which needs a compiler at run time and
    fails outright in a Python-backend stub, whose locale is C (inductor reads its templates as
    ASCII)."""
    import torch

    allowed = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), bitorder="little")[: logits.shape[-1]]
    logits.masked_fill_(torch.from_numpy(allowed.view(bool)).logical_not().to(logits.device), float("-inf"))
