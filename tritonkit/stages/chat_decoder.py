"""LLaVA's language model (PyTorch) generating answers for a dynamic batch of image features + prompts.

Inputs: IMAGE_FEATURES [tokens, hidden] (the vision encoder's; absent in a text-only turn), PROMPT (STRING [1]) or MESSAGES
(a JSON conversation, `tritonkit.chat_decoding.conversation`), and the optional MAX_NEW_TOKENS,
TEMPERATURE, TOP_P, SEED, STOP, TOP_LOGPROBS, RESPONSE_FORMAT (OpenAI's `response_format` as JSON:
json_object or json_schema constrain every step of the row to what the schema allows). Outputs: TEXT, PROMPT_TOKENS, COMPLETION_TOKENS and
FINISH_REASON (what OpenAI's `usage` and `finish_reason` report), LOGPROBS (with TOP_LOGPROBS: the
response's tokens as OpenAI's `logprobs.content`, JSON; empty without). In a decoupled model
(`model_transaction_policy { decoupled: true }`, the NAME_chat_stream ensemble) every request gets
its text piece by piece as tokens are generated (with the token counts so far and an empty
FINISH_REASON), then a final response with empty TEXT, the counts and the FINISH_REASON. Parameters:
`language_model_dir`, `processor_dir`, `max_new_tokens` (default and limit), `image_token_id`,
`eos_token_ids` (JSON), `device` (cpu or cuda), `max_prompt_bytes`. See `tritonkit.chat_decoding`.

Batching (`decoder_batching`): `inflight` (the default) hands each request to the instance's step
loop (`tritonkit.chat_loop.ChatLoop`) and returns: requests join the running answers between
steps and each is answered when its own answer is done. `max_rows_in_flight` answers are generated
at once (default: the max batch size) and `max_queued` more may wait (default 4x that); past them
a request fails at once with UNAVAILABLE (retry later). A cancelled request frees its row within
`cancel_check_ms`. Streamed text is sent at most every `stream_interval_ms` (default 20) unless
`stream_tokens` tokens (default 8) are waiting; the last piece is sent at once. `static` keeps the
earlier scheduler (a dynamic batch generated to its longest answer), for comparison.
"""

import functools
import json
import time

import numpy as np

from tritonkit.batched_model import BatchedModel, Failure, concat_rows, object_rows, string_rows
from tritonkit.chat_decoding import (
    DEFAULT_MAX_PROMPT_BYTES,
    ChatGenerator,
    ChatOptions,
    chat_prompt,
    chat_text,
    conversation,
    logprobs_json,
    response_grammar,
)
from tritonkit.contracts import COMPLETION_TOKENS, FINISH_REASON, LOGPROBS, PROMPT_TOKENS, RESPONSE_FORMAT, TOP_LOGPROBS
from tritonkit.errors import InputError
from tritonkit.step_loop import Answer


class TritonPythonModel(BatchedModel):
    metrics_role = "decoder"

    def setup(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor

        device = self.parameters.get("device", "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{self.model_name} was built for a GPU (--target gpu) and no CUDA device is visible")
        self.torch_threads()  # its share of the cores: instances left with torch's default fight over them
        model_dir = str(self.version_dir / self.parameters["language_model_dir"])
        # Qwen-VL: a text model with M-RoPE beside its head (tritonkit.qwen_vl); otherwise a causal LM
        merge_size = int(self.parameters.get("mrope_merge_size", "0")) or None
        if merge_size:
            from transformers import AutoTokenizer

            from tritonkit.qwen_vl import load_language_model

            language_model = load_language_model(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(str(self.version_dir / self.parameters["processor_dir"]))
            self.processor = tokenizer  # its chat template renders the conversations
        else:
            language_model = AutoModelForCausalLM.from_pretrained(model_dir)
            self.processor = AutoProcessor.from_pretrained(str(self.version_dir / self.parameters["processor_dir"]))
            tokenizer = self.processor.tokenizer
        self.generator = ChatGenerator(
            language_model.eval().to(device),
            tokenizer,
            int(self.parameters["image_token_id"]),
            json.loads(self.parameters["eos_token_ids"]),
            device,
            mrope_merge_size=merge_size,
        )
        self.max_new_tokens = int(self.parameters["max_new_tokens"])
        self.max_prompt_bytes = int(self.parameters.get("max_prompt_bytes", DEFAULT_MAX_PROMPT_BYTES))
        self.decoupled = bool(self.model_config.get("model_transaction_policy", {}).get("decoupled", False))
        (
            self.features_input,
            self.prompt_input,
            self.max_tokens_input,
            self.temperature_input,
            self.top_p_input,
            self.seed_input,
            self.stop_input,
            *_,
        ) = self.input_names
        self.messages_input, self.top_logprobs_input, self.response_format_input = (
            "MESSAGES",
            TOP_LOGPROBS,
            RESPONSE_FORMAT,
        )
        # Qwen-VL's patch grids of each request's images (its features are ragged: [tokens of all its images, hidden])
        self.grid_input = "GRID_THW" if "GRID_THW" in self.input_names else None
        self.text_output = next(iter(self.output_dtypes))
        self.loop = None
        if self.parameters.get("decoder_batching", "inflight") == "inflight":
            from tritonkit.chat_loop import ChatLoop

            rows = int(self.parameters.get("max_rows_in_flight") or self.model_config.get("max_batch_size") or 8)
            self.loop = ChatLoop(
                self.generator,
                self.max_new_tokens,
                max_rows=rows,
                max_queued=int(self.parameters.get("max_queued") or 4 * rows),
                cancel_check_s=int(self.parameters.get("cancel_check_ms", "100")) / 1000,
                on_rows=self.metrics.decoder_rows,
            )
            self.stream_interval_s = int(self.parameters.get("stream_interval_ms", "20")) / 1000
            self.stream_tokens = int(self.parameters.get("stream_tokens", "8"))

    def row_options(self, inputs, count: int) -> list[ChatOptions]:
        def column(name, convert):
            if name not in inputs:
                return [None] * count
            values = inputs[name].reshape(count, -1) if inputs[name].size else np.zeros((count, 0))
            if len(values) != count:
                raise InputError(
                    f"{name}: {len(values)} rows for {count} prompts; give one per row", reason="bad_option"
                )
            return [convert(row, name) for row in values]

        limits = column(self.max_tokens_input, lambda row, _: int(row[0]))
        temperatures = column(self.temperature_input, lambda row, _: float(row[0]))
        top_ps = column(self.top_p_input, lambda row, _: float(row[0]))
        seeds = column(self.seed_input, lambda row, _: int(row[0]))
        stops = column(self.stop_input, lambda row, name: tuple(s for s in string_rows(row, name) if s))
        tops = column(self.top_logprobs_input, lambda row, _: int(row[0]))
        grammars = column(self.response_format_input, lambda row, name: response_grammar(string_rows(row, name)[0]))
        if self.loop is None and any(grammars):
            raise InputError(
                f"{RESPONSE_FORMAT}: structured outputs need the in-flight decoder (decoder_batching inflight, "
                "the default)",
                reason="bad_option",
            )
        return [
            ChatOptions(
                max_new_tokens=limit,
                temperature=0.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                seed=seed,
                stop=stop or (),
                top_logprobs=top,
                grammar=grammar,
            ).validate(self.max_new_tokens)
            for limit, temperature, top_p, seed, stop, top, grammar in zip(
                limits, temperatures, top_ps, seeds, stops, tops, grammars
            )
        ]

    def prepare(self, inputs):
        if self.features_input not in inputs:  # a text-only turn (NAME_chat_text): no image, no features
            features, tokens_per_image, grid_rows = None, None, None
        elif self.grid_input is not None:  # one conversation per request, its images' features in one ragged row
            from tritonkit.qwen_vl import image_tokens

            features, grids = inputs[self.features_input], inputs[self.grid_input]
            if len(features) != 1 or len(grids) != 1:
                raise InputError(f"{self.model_name}: send one conversation per request", reason="bad_option")
            tokens_per_image = [[image_tokens(grid, self.generator.mrope_merge_size) for grid in grids[0]]]
            if sum(tokens_per_image[0]) != features.shape[1]:
                raise RuntimeError(f"{features.shape[1]} image features for grids {grids[0].tolist()}")
            grid_rows = object_rows([grids[0]])
        else:
            features = inputs[self.features_input]
            tokens_per_image = [[features.shape[1]] for _ in range(len(features))]
            grid_rows = None
        given = [name for name in (self.prompt_input, self.messages_input) if name in inputs]
        if len(given) != 1:
            raise InputError(
                f"{self.prompt_input} or {self.messages_input}: give exactly one "
                f"({self.prompt_input}: a question; {self.messages_input}: a JSON conversation)",
                reason="bad_option",
            )
        (name,) = given
        for raw in inputs[name].reshape(-1):
            if len(raw) > self.max_prompt_bytes:
                raise InputError(
                    f"{name}: {len(raw)} bytes exceeds the {self.max_prompt_bytes} byte limit "
                    "(max_prompt_bytes; rebuild with --max-prompt-bytes to change it)",
                    reason="too_long",
                )
        prompts = string_rows(inputs[name], name)
        if features is None:
            hidden = self.generator.embed.embedding_dim
            features = [np.zeros((0, hidden), dtype=np.float32) for _ in prompts]
            tokens_per_image = [[] for _ in prompts]
            if self.grid_input is not None:
                grid_rows = object_rows([np.zeros((0, 3), dtype=np.int64) for _ in prompts])
        if len(prompts) != len(features):
            raise InputError(f"{name}: {len(prompts)} prompts for {len(features)} images", reason="bad_option")
        if self.decoupled and len(prompts) != 1:
            raise InputError(
                f"{self.model_name} streams one answer per request; send one image and prompt", reason="bad_option"
            )
        options = self.row_options(inputs, len(prompts))
        images = [len(counts) for counts in tokens_per_image]
        if name == self.prompt_input:
            texts = [self.prompt_text(prompt, count) for prompt, count in zip(prompts, images)]
        else:
            texts = [
                chat_text(self.processor, conversation(raw, name, count, self.placeholder))
                for raw, count in zip(prompts, images)
            ]
        ids = object_rows([self.generator.prompt_ids(text, counts) for text, counts in zip(texts, tokens_per_image)])
        packed = object_rows(
            [
                self.generator.fit(row_ids, sum(counts), row_options, self.max_new_tokens)
                for row_ids, counts, row_options in zip(ids, tokens_per_image, options)
            ]
        )
        # features as one object per row: rows of image turns and text-only turns concatenate
        rows = {self.features_input: object_rows(list(features)), "prompt_ids": ids, "options": packed}
        if grid_rows is not None:
            rows["grids"] = grid_rows
        return rows

    @property
    def placeholder(self) -> str:
        """The image token as text (users may not write it)."""
        if self.generator.mrope_merge_size is None:
            return "<image>"
        return self.generator.tokenizer.convert_ids_to_tokens(self.generator.image_token_id)

    def prompt_text(self, prompt: str, images: int = 1) -> str:
        if self.placeholder in prompt:
            where = "IMAGE" if self.grid_input is None else "IMAGE or IMAGES"
            raise InputError(
                f"{self.prompt_input}: do not write {self.placeholder}; the image goes in {where}", reason="bad_text"
            )
        return chat_prompt(self.processor, prompt, images)

    def generate(self, batch, on_text=None):
        return self.generator.generate(
            list(batch[self.features_input]),
            list(batch["prompt_ids"]),
            list(batch["options"]),
            self.max_new_tokens,
            on_text,
            list(batch["grids"]) if "grids" in batch else None,
        )

    def run(self, batch):
        return self.answer_outputs(self.generate(batch), [len(ids) for ids in batch["prompt_ids"]])

    def answer_outputs(self, results, prompt_tokens: list[int]) -> dict:
        """What `finish` makes the responses of from the rows' answers (static or in-flight)."""
        return {
            self.text_output: np.array([[r.text.encode()] for r in results], dtype=object),
            "tokens": np.array([len(r.tokens) for r in results], dtype=np.int64),
            "steps": np.array([r.steps for r in results], dtype=np.int64),
            "prompt_tokens": np.array(prompt_tokens, dtype=np.int64),
            "reasons": np.array([[r.reason.encode()] for r in results], dtype=object),
            "logprobs": object_rows([r.logprobs for r in results]),
        }

    def finish(self, outputs, rows):
        self.metrics.decoded(tokens=int(outputs["tokens"].sum()), steps=int(outputs["steps"].sum()))
        return {  # the text, and what OpenAI's usage, finish_reason and logprobs report
            self.text_output: outputs[self.text_output],
            PROMPT_TOKENS: outputs["prompt_tokens"][:, None],
            COMPLETION_TOKENS: outputs["tokens"][:, None],
            FINISH_REASON: outputs["reasons"],
            LOGPROBS: np.array(
                [
                    [self.logprobs_text(entries, options)]
                    for entries, options in zip(outputs["logprobs"], rows["options"])
                ],
                dtype=object,
            ),
        }

    def logprobs_text(self, entries, options: ChatOptions) -> bytes:
        """LOGPROBS of a response: OpenAI's `logprobs.content` for its tokens as JSON; empty when
        the request did not ask (TOP_LOGPROBS absent)."""
        if options.top_logprobs is None:
            return b""
        return logprobs_json(self.generator.tokenizer, entries).encode()

    def finalize(self):
        if self.loop is not None:
            self.loop.stop()
        super().finalize()

    def execute(self, requests):
        if self.loop is not None:
            for request in requests:
                self.submit(request)
            self.metrics.resident()
            return None
        if not self.decoupled:
            return super().execute(requests)
        import triton_python_backend_utils as pb_utils

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        prepared = []
        for request in requests:
            sender = request.get_response_sender()
            rows = self.prepare_request(request)
            if isinstance(rows, dict):
                prepared.append((sender, rows))
            else:
                sender.send(pb_utils.InferenceResponse(error=rows.error()), flags=final)
        if prepared:
            self.stream(prepared)
        self.metrics.resident()
        return None

    def stream(self, prepared) -> None:
        """Generate for every request together, sending pieces as they come. When the batch fails,
        the requests that had received nothing yet are generated again alone; one that had already
        received text gets an error of its own (its text cannot be taken back)."""
        import triton_python_backend_utils as pb_utils

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [sender for sender, _ in prepared]
        prompt_tokens = [len(rows["prompt_ids"][0]) for _, rows in prepared]
        started = [False] * len(prepared)

        options = [rows["options"][0] for _, rows in prepared]
        sent_logprobs = [0] * len(prepared)  # each row's logprobs entries already sent

        def response(row, piece: str, result, reason: str):
            entries, sent_logprobs[row] = result.logprobs[sent_logprobs[row] :], len(result.logprobs)
            logprobs = self.logprobs_text(entries, options[row])
            return stream_response(self, piece, prompt_tokens[row], len(result.tokens), reason, logprobs)

        def send_piece(row, piece, result):
            senders[row].send(response(row, piece, result, ""))
            started[row] = True

        try:
            results = self.generate(concat_rows([rows for _, rows in prepared]), send_piece)
        except Exception as exc:
            message = self.failure(exc, "a streamed batch")
            if len(prepared) > 1:
                for (sender, rows), sent in zip(prepared, started):
                    if sent:
                        sender.send(pb_utils.InferenceResponse(error=message.error()), flags=final)
                    else:
                        self.stream([(sender, rows)])
            else:
                senders[0].send(pb_utils.InferenceResponse(error=message.error()), flags=final)
            return
        for row, (sender, result) in enumerate(zip(senders, results)):
            self.metrics.decoded(tokens=len(result.tokens), steps=result.steps)
            sender.send(response(row, "", result, result.reason), flags=final)

    # -- in-flight batching ---------------------------------------------------------------
    def submit(self, request) -> None:
        """Check a request and hand its rows to the step loop; a bad or unplaceable one is answered now."""
        import triton_python_backend_utils as pb_utils

        from tritonkit.chat_loop import ChatJob, QueueFull

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sender = request.get_response_sender()
        rows = self.prepare_request(request)
        if isinstance(rows, Failure):
            sender.send(pb_utils.InferenceResponse(error=rows.error()), flags=final)
            return
        answer = StreamedAnswer(self, request, rows) if self.decoupled else WholeAnswer(self, request, rows)
        jobs = [
            ChatJob(
                features=rows[self.features_input][i],
                prompt_ids=list(rows["prompt_ids"][i]),
                options=rows["options"][i],
                on_done=functools.partial(answer.done, i),
                on_error=functools.partial(answer.failed, i),
                on_text=answer.text if isinstance(answer, StreamedAnswer) else None,
                cancelled=answer.cancelled,
                grid=rows["grids"][i] if "grids" in rows else None,
            )
            for i in range(answer.count)
        ]
        try:  # a request's rows are taken together: the choices of one prompt (OpenAI's n) share its prefill
            self.loop.submit_all(jobs)
        except QueueFull as exc:
            answer.failed(0, exc)


class WholeAnswer(Answer):
    """A request to the whole-answer model: answered once all its rows are done (the choices of
    OpenAI's n), or failed at its first failed row."""

    def __init__(self, model, request, rows):
        super().__init__(request)
        self.model, self.sender, self.rows = model, request.get_response_sender(), rows
        self.count = len(rows["prompt_ids"])
        self.results = [None] * self.count

    def done(self, i, result) -> None:
        with self.lock:
            self.results[i] = result
            if self.answered or any(r is None for r in self.results):
                return
            self.answered = True
        import triton_python_backend_utils as pb_utils

        outputs = self.model.answer_outputs(self.results, [r.prompt_tokens for r in self.results])
        self.sender.send(self.model.respond(outputs, self.rows), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def failed(self, i, exc) -> None:
        with self.lock:
            if self.answered:
                return
            self.answered = True
        send_error(self.model, self.sender, exc)


class StreamedAnswer(Answer):
    """A request to the streaming model: its text in pieces, at most every `stream_interval_ms`
    unless `stream_tokens` tokens wait, then a final response with the counts and the reason."""

    count = 1

    def __init__(self, model, request, rows):
        super().__init__(request)
        self.model, self.sender = model, request.get_response_sender()
        self.pending = ""
        self.waiting = 0  # tokens whose text is pending
        self.sent_at = 0.0
        self.prompt_tokens = len(rows["prompt_ids"][0])
        self.options = rows["options"][0]
        self.sent_logprobs = 0  # logprobs entries already sent

    def response(self, piece: str, result, reason: str):
        entries, self.sent_logprobs = result.logprobs[self.sent_logprobs :], len(result.logprobs)
        logprobs = self.model.logprobs_text(entries, self.options)
        return stream_response(self.model, piece, self.prompt_tokens, len(result.tokens), reason, logprobs)

    def text(self, piece: str, result) -> None:
        self.pending += piece
        self.waiting += 1
        now = time.monotonic()
        if now - self.sent_at >= self.model.stream_interval_s or self.waiting >= self.model.stream_tokens:
            self.flush(result)
            self.sent_at = now

    def flush(self, result) -> None:
        if self.pending:
            self.sender.send(self.response(self.pending, result, ""))
            self.pending, self.waiting = "", 0

    def done(self, i, result) -> None:
        import triton_python_backend_utils as pb_utils

        with self.lock:
            self.answered = True
        self.model.metrics.decoded(tokens=len(result.tokens), steps=result.steps)
        self.flush(result)
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        self.sender.send(self.response("", result, result.reason), flags=final)

    def failed(self, i, exc) -> None:
        with self.lock:
            self.answered = True
        send_error(self.model, self.sender, exc)


def send_error(model, sender, exc: Exception) -> None:
    """A request's error: a bad input INVALID_ARG, a full queue UNAVAILABLE, a bug INTERNAL."""
    import triton_python_backend_utils as pb_utils

    from tritonkit.chat_loop import CancelledError, QueueFull

    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    codes: dict[type[Exception], str] = {QueueFull: "UNAVAILABLE", CancelledError: "CANCELLED"}
    code = codes.get(type(exc))
    if code is None:
        error = model.failure(exc, "a request").error()
    else:
        model.metrics.rejected("queue_full" if code == "UNAVAILABLE" else "cancelled")
        error = pb_utils.TritonError(f"{model.model_name}: {exc}", getattr(pb_utils.TritonError, code))
    sender.send(pb_utils.InferenceResponse(error=error), flags=final)


def stream_response(model, piece: str, prompt_tokens: int, completion_tokens: int, reason: str, logprobs: bytes = b""):
    """One streamed response: a piece of text with the counts so far, the finish reason and the
    logprobs of the tokens since the last response."""
    import triton_python_backend_utils as pb_utils

    tensors = {
        model.text_output: np.array([[piece.encode()]], dtype=object),
        PROMPT_TOKENS: np.array([[prompt_tokens]], dtype=np.int32),
        COMPLETION_TOKENS: np.array([[completion_tokens]], dtype=np.int32),
        FINISH_REASON: np.array([[reason.encode()]], dtype=object),
        LOGPROBS: np.array([[logprobs]], dtype=object),
    }
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])
