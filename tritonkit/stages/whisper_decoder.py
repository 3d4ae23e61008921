"""Whisper's decoder: a whole dynamic batch of windows decoded together with a KV cache (greedy,
sampled at a TEMPERATURE, or with OpenAI's temperature fallback; see WindowDecoder).

Inputs: encoder hidden states, `WINDOW_ROW` (the request row each window belongs to) and
`DECODE_OPTIONS` (each window's options, checked by the preprocessing model). Outputs, one row per
request row: the text, its tokens (windows joined in order; padded with -1) and the language of
its first window. Windows the fallback judged silent give no text and no segments. A row whose
options say `long_form` carries its file's whole features (`FILE_FEATURES`): it is decoded with
OpenAI's sequential algorithm (`tritonkit.whisper_decoding.LongForm`), its windows encoded by the
`encoder_model` (Triton's BLS), every long file's current window one row of the same batch.
A request whose windows are final is answered at once (its response sender), while its batch
mates' windows that fall back are decoded again. Parameter `providers`: ONNX Runtime execution providers, comma-separated
(default CPUExecutionProvider; GPU repositories ask for CUDA first); `engine` and
`inference_precision` as in onnx_encoder. Files: cross_kv.onnx and step.onnx (OpenVINO: cross_kv.xml
and step.xml with their .bin), tokenizer/. Parameter `decode_settings`: the JSON
of `tritonkit.whisper_decoding.DecodeSettings`.

Batching (`decoder_batching`): `inflight` (the default; repositories whose step graph takes
OFFSETS) hands each request's windows to the instance's step loop (`tritonkit.whisper_loop`) and
returns: windows join the running rows between steps and each request is answered when its own
windows are final; a long-form file's next window is encoded (BLS, on a worker thread) and taken
ahead of the queue as soon as the one before is final. `max_rows_in_flight` windows decode at once (a beam-search window
counts once; default: the max batch size), `max_queued` more may wait (default 4x that); past them a request fails at once with
UNAVAILABLE (retry later). A cancelled request frees its rows within `cancel_check_ms`. `static`
keeps the earlier scheduler (the whole dynamic batch decoded together, as described above).
"""

import functools
import threading
from dataclasses import replace

import numpy as np

from tritonkit.batched_model import BatchedModel
from tritonkit.errors import InputError
from tritonkit.step_loop import Answer
from tritonkit.whisper_decoding import (
    SECONDS_PER_FRAME,
    DecodeOptions,
    DecodeSettings,
    LongForm,
    SequentialFile,
    WindowDecoder,
    WindowResult,
    segments,
)
from tritonkit.word_timing import TimedSegment, WordAligner


class TritonPythonModel(BatchedModel):
    metrics_role = "decoder"
    early_responses = True  # a request is answered when its windows are final, not when its batch is

    def setup(self):
        from transformers import AutoTokenizer

        from tritonkit.engines import onnxruntime_providers

        providers = onnxruntime_providers(self.parameters, self.model_name)

        def session(stem):  # `STEM_file`: the graph (ONNX, or OpenVINO's IR)
            return self.open_session(self.version_dir / self.parameters[f"{stem}_file"], providers=providers)

        self.settings = DecodeSettings.from_json(self.parameters["decode_settings"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.version_dir / self.parameters["tokenizer_dir"]))
        self.decoder = WindowDecoder(
            session("cross_kv"),
            session("step"),
            self.settings,
            prompt_ids=lambda text: [int(t) for t in self.tokenizer.get_prompt_ids(text)],
            text_of=lambda tokens: self.text(tokens).decode(),
        )
        self.hidden_input, self.row_input, self.options_input, self.features_input = self.input_names
        self.text_output, self.tokens_output, self.language_output, *more = self.output_dtypes
        self.segment_outputs = [n for n in more if n.startswith("SEGMENT_")]  # SEGMENT_TIMES, _TEXTS, _STATS
        self.word_outputs = [n for n in more if n.startswith("WORD_")]  # WORD_TIMES, WORD_TEXTS, WORD_PROBS
        self.aligner = WordAligner(
            session("align"),
            self.settings,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        )
        self.encoder_model = self.parameters.get("encoder_model")
        # decoupled (the NAME_stream ensemble's decoder): a request's text is sent as it becomes final
        self.streaming = bool(self.model_config.get("model_transaction_policy", {}).get("decoupled"))
        self.long_form = LongForm(self.decoder, self.encode)
        self.loop = None
        if self.parameters.get("decoder_batching", "inflight") == "inflight":
            from concurrent.futures import ThreadPoolExecutor

            from tritonkit.whisper_loop import WhisperLoop

            rows = int(self.parameters.get("max_rows_in_flight") or self.model_config.get("max_batch_size") or 8)
            self.loop = WhisperLoop(
                self.decoder,
                max_rows=rows,
                max_queued=int(self.parameters.get("max_queued") or 4 * rows),
                cancel_check_s=int(self.parameters.get("cancel_check_ms", "100")) / 1000,
                on_rows=self.metrics.decoder_rows,
            )
            # long-form files' next windows are encoded here (Triton's BLS), never on the loop's thread;
            # concurrent calls meet in the encoder's dynamic batcher
            self.encoding = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tritonkit-encode")
        elif self.streaming:
            raise RuntimeError(f"{self.model_name}: streaming needs the in-flight decoder (decoder_batching inflight)")

    def finalize(self):
        if self.loop is not None:
            self.loop.stop()
            self.encoding.shutdown(wait=False, cancel_futures=True)
        super().finalize()

    def execute(self, requests):
        if self.loop is None:
            return super().execute(requests)
        for request in requests:
            self.submit(request)
        self.metrics.resident()
        return None

    def encode(self, features: np.ndarray) -> np.ndarray:
        """The encoder model on a batch of windows (Triton's BLS), in chunks of its max batch size."""
        import triton_python_backend_utils as pb_utils

        if self.encoder_model is None:
            raise RuntimeError(f"{self.model_name}: no encoder_model parameter for long-form decoding")
        hidden = []
        for start in range(0, len(features), self.encoder_batch):
            request = pb_utils.InferenceRequest(
                model_name=self.encoder_model,
                inputs=[pb_utils.Tensor("INPUT_FEATURES", features[start : start + self.encoder_batch])],
                requested_output_names=["ENCODER_HIDDEN"],
            )
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"{self.encoder_model}: {response.error().message()}")
            hidden.append(pb_utils.get_output_tensor_by_name(response, "ENCODER_HIDDEN").as_numpy())
        return np.concatenate(hidden)

    @property
    def encoder_batch(self) -> int:
        """The encoder's max batch size (as built; --max-batch-size lowers every model's alike)."""
        return min(int(self.parameters.get("encoder_max_batch_size", "8")), int(self.model_config["max_batch_size"]))

    def prepare(self, inputs):
        options = np.empty(len(inputs[self.options_input]), dtype=object)
        options[:] = [DecodeOptions.from_json(raw) for raw in inputs[self.options_input].reshape(-1)]
        # ragged across requests: one object per window row
        features = np.empty(len(options), dtype=object)
        features[:] = [f[:, : o.total_frames] for f, o in zip(inputs[self.features_input], options)]
        return {**inputs, "options": options, self.features_input: features}

    def run(self, batch):
        """Every window's tokens and segments (times on its file's timeline, OpenAI's figures)."""
        options = list(batch["options"])
        count = len(options)
        long_rows = [i for i, o in enumerate(options) if o.long_form]
        short_rows = [i for i in range(count) if i not in set(long_rows)]
        ready = np.zeros(count, dtype=bool)
        outputs = row_outputs(count)
        window_tokens, window_segments, languages, steps, window_words = (outputs[name] for name in ROW_OUTPUTS)
        if any(options[i].word_timestamps for i in long_rows):
            raise InputError(
                "WORD_TIMESTAMPS: long-form files need the in-flight decoder (decoder_batching inflight, the default)",
                reason="bad_option",
            )

        def final(windows, tokens, decoded):
            """Short windows done: their rows' outputs, and the requests they complete answered now."""
            for k in windows:
                i = short_rows[k]
                result = WindowResult.of(self.decoder, k, tokens[k], decoded[k])
                row = self.window_outputs(options[i], result, batch[self.hidden_input][i])
                window_tokens[i], window_segments[i], languages[i], steps[i], window_words[i] = row
                ready[i] = True
            if windows:
                self.release(outputs, ready)

        if short_rows:
            hidden = batch[self.hidden_input][short_rows]
            tokens, decoded = self.decoder.decode(hidden, [options[i] for i in short_rows], on_final=final)
            final(
                [k for k, i in enumerate(short_rows) if not ready[i]], tokens, decoded
            )  # windows with nothing to decode
        if long_rows:
            files = self.long_form.transcribe(
                [batch[self.features_input][i] for i in long_rows],
                [options[i] for i in long_rows],
                first_hidden=batch[self.hidden_input][long_rows],
            )
            for i, result in zip(long_rows, files):
                row = self.file_outputs(options[i], result)
                window_tokens[i], window_segments[i], languages[i], steps[i], window_words[i] = row
        return outputs

    def window_outputs(self, options: DecodeOptions, result: WindowResult, hidden: np.ndarray):
        """A short window's row: its tokens, segments (times on the file; OpenAI's per-window
        figures shared by its segments), language, steps and words (with WORD_TIMESTAMPS)."""
        kept = [] if result.skipped else result.tokens
        found = []
        begin = self.settings.timestamp_begin
        timed = [(options.offset_s, options.offset_s + options.duration_s, kept)]
        if options.timestamps and begin is not None:
            stats = replace(result, tokens=kept).stats(self.text(kept).decode())
            timed = segments(kept, begin, options.offset_s, options.duration_s)
            found = [(*options.original_span(start, end), text, stats) for start, end, text in timed]
        words = []
        if options.word_timestamps:
            words, _ = self.window_words(hidden, timed, result.language, options, 0.0)
        return kept, found, result.language, result.steps, words

    def window_words(self, hidden, timed, language, options: DecodeOptions, last_speech: float):
        """The words of one window's segments ((start, end, tokens) on the decoded timeline) as
        (start, end, text, probability) on the original file, and the end of its last speech."""
        audio_s = options.duration_s  # the window's audio, before the padding long-form decoding adds past the file
        if options.file_s:
            audio_s = min(audio_s, options.file_s - options.offset_s)
        frames = max(2, round(audio_s / SECONDS_PER_FRAME))
        per_segment, last_speech = self.aligner.words(
            hidden,
            [TimedSegment(start, end, list(tokens)) for start, end, tokens in timed],
            language,
            options.task,
            frames,
            options.offset_s,
            last_speech,
        )
        words = [
            (*options.original_span(w.start, w.end), w.word, w.probability) for found in per_segment for w in found
        ]
        return words, last_speech

    def file_outputs(self, options: DecodeOptions, transcript):
        """A long-form file's row, as `window_outputs`."""
        tokens = [t for _, _, piece, _ in transcript.segments for t in piece]
        found = [(*options.original_span(start, end), piece, stats) for start, end, piece, stats in transcript.segments]
        return tokens, found, transcript.language, transcript.steps, transcript.words

    # -- in-flight batching ---------------------------------------------------------------
    def submit(self, request) -> None:
        """Check a request and hand its windows to the step loop (a long-form file its first
        window); a bad or unplaceable one is answered now."""
        from tritonkit.whisper_loop import WindowJob

        rows = self.prepare_request(request)
        if isinstance(rows, dict) and self.streaming and int(rows[self.row_input].max()) > 0:
            rows = self.failure(
                InputError("AUDIO: the streaming ensemble takes one file per request", reason="bad_option"), ""
            )
        if not isinstance(rows, dict):
            send_failure(request, rows)
            return
        answer = RequestAnswer(self, request, rows)
        cancelled = answer.cancelled
        jobs = []
        for i, options in enumerate(rows["options"]):
            if options.long_form:
                file = SequentialFile(rows[self.features_input][i], options, self.decoder)
                if file.done:
                    answer.done(i, self.file_outputs(options, file.transcript))
                    continue
                hidden = rows[self.hidden_input][i] if file.encoded else None
                jobs.append(self.file_window(file, hidden, answer, i, cancelled))
            else:
                hidden = rows[self.hidden_input][i]
                jobs.append(
                    WindowJob(
                        hidden,
                        options,
                        on_done=functools.partial(self.answer_window, answer, i, options, hidden=hidden),
                        on_error=answer.failed,
                        cancelled=cancelled,
                    )
                )
        try:
            self.loop.submit_all(jobs)
        except Exception as exc:
            answer.failed(exc)

    def answer_window(self, answer, row: int, options: DecodeOptions, result, hidden) -> None:
        """A short window is final: its row answered (its words timed off the loop's thread)."""

        def outputs():
            try:
                answer.done(row, self.window_outputs(options, result, hidden))
            except Exception as exc:  # the request fails, never hangs
                answer.failed(exc)

        if options.word_timestamps:
            self.encoding.submit(outputs)
        else:
            outputs()

    def file_window(self, file, hidden, answer, row: int, cancelled):
        """The WindowJob of a long-form file's current window (`hidden`: its encoder output if
        known); once it is final, the file's next window is encoded and submitted."""
        from tritonkit.whisper_loop import WindowJob

        features, options = file.next_window()
        if hidden is None:
            hidden = self.encode(features[None])[0]

        def done(result):
            if options.word_timestamps:  # timed off the loop's thread
                self.encoding.submit(window_final, result)
            else:
                window_final(result)

        def window_final(result):
            try:
                before = len(file.transcript.segments)
                file.window_done(result)
                if options.word_timestamps and not result.skipped:
                    timed = [(start, end, piece) for start, end, piece, _ in file.transcript.segments[before:]]
                    words, file.transcript.last_speech = self.window_words(
                        hidden, timed, file.transcript.language, options, file.transcript.last_speech
                    )
                    file.transcript.words += words
                if self.streaming and not file.done:
                    answer.advanced(row, file.transcript)
                if file.done:
                    answer.done(row, self.file_outputs(file.options, file.transcript))
                else:
                    self.encoding.submit(self.next_file_window, file, answer, row, cancelled)
            except Exception as exc:  # the request fails, never hangs
                answer.failed(exc)

        return WindowJob(hidden, options, on_done=done, on_error=answer.failed, cancelled=cancelled)

    def next_file_window(self, file, answer, row: int, cancelled) -> None:
        try:
            if cancelled():
                from tritonkit.step_loop import CancelledError

                raise CancelledError("the request was cancelled")
            self.loop.submit_all([self.file_window(file, None, answer, row, cancelled)], queued_anyway=True)
        except Exception as exc:
            answer.failed(exc)

    def finish(self, outputs, rows):
        owners = rows[self.row_input].reshape(-1)
        count = int(owners.max()) + 1
        joined = [[] for _ in range(count)]
        found = [[] for _ in range(count)]
        words = [[] for _ in range(count)]
        languages = [b""] * count
        windows = zip(
            owners,
            outputs["window_tokens"],
            outputs["window_language"],
            outputs["window_segments"],
            outputs["window_words"],
        )
        for owner, tokens, language, window_segments, window_words in windows:
            if not languages[owner]:
                languages[owner] = (language or "").encode()
            joined[owner].extend(tokens)
            found[owner] += window_segments
            words[owner] += window_words or []
        width = max(1, max(len(t) for t in joined))
        token_array = np.full((count, width), -1, dtype=np.int64)
        for i, t in enumerate(joined):
            token_array[i, : len(t)] = t
        # a streamed piece's TEXT: the new end of the text so far (its leading space kept)
        piece = outputs.get("text_piece")
        texts = [self.text(t) for t in joined] if piece is None else [piece.encode()]
        self.metrics.decoded(tokens=sum(len(t) for t in joined), steps=int(outputs["window_steps"].sum()))
        response = {
            self.text_output: np.array(texts, dtype=object)[:, None],
            self.tokens_output: token_array,
            self.language_output: np.array(languages, dtype=object)[:, None],
        }
        response.update(zip(self.segment_outputs, padded(found, self.text, (4,))))
        response.update(zip(self.word_outputs, padded(words, str.encode)))
        return response

    def text(self, tokens) -> bytes:
        """Decoded text without timestamp tokens, stripped."""
        begin = self.settings.timestamp_begin
        kept = [t for t in tokens if begin is None or t < begin]
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip().encode()


def padded(items: list[list[tuple]], text_of, figures: tuple[int, ...] = ()):
    """Per request row, its (start, end, text, figures) items as padded arrays: times [rows,
    most, 2] (-1 where none), texts [rows, most] (b"") and figures [rows, most, *figures] (0)."""
    most = max(1, max(len(row) for row in items))
    times = np.full((len(items), most, 2), -1.0, dtype=np.float32)
    texts = np.full((len(items), most), b"", dtype=object)
    values = np.zeros((len(items), most, *figures), dtype=np.float32)
    for i, row in enumerate(items):
        for k, (start, end, text, value) in enumerate(row):
            times[i, k] = (start, end)
            texts[i, k] = text_of(text)
            values[i, k] = value
    return times, texts, values


# what `run` gives each window row (`window_outputs`, `file_outputs`), which `finish` joins per request
ROW_OUTPUTS = ("window_tokens", "window_segments", "window_language", "window_steps", "window_words")


def row_outputs(count: int) -> dict[str, np.ndarray]:
    outputs = {name: np.empty(count, dtype=object) for name in ROW_OUTPUTS}
    outputs["window_steps"] = np.zeros(count, dtype=np.int64)
    return outputs


# Responses leave this stub from the step loop's thread and the worker threads that time words;
# the Python backend's response path is taken by one of them at a time.
SENDING = threading.Lock()


def send(request, response, final: bool = True) -> None:
    import triton_python_backend_utils as pb_utils

    flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
    with SENDING:
        request.get_response_sender().send(response, flags=flags)


def send_failure(request, failure) -> None:
    import triton_python_backend_utils as pb_utils

    send(request, pb_utils.InferenceResponse(error=failure.error()))


class RequestAnswer(Answer):
    """A request's rows (short windows or long-form files): answered once every row is final, or
    failed at its first error."""

    def __init__(self, model, request, rows):
        super().__init__(request)
        count = len(rows["options"])
        self.model, self.request, self.rows = model, request, rows
        self.outputs = row_outputs(count)
        self.finished = np.zeros(count, dtype=bool)
        self.left = count
        # streaming: a long-form row's transcript so far, and how much of the file was sent
        self.partial: dict[int, object] = {}
        self.sent_text, self.sent_tokens, self.sent_segments, self.sent_words = "", 0, 0, 0

    def done(self, row: int, outputs) -> None:
        with self.lock:
            if self.answered:
                return
            for name, value in zip(ROW_OUTPUTS, outputs):
                self.outputs[name][row] = value
            self.finished[row] = True
            self.left -= 1
            if self.model.streaming:
                self.answered = not self.left
                self.stream(final=not self.left)
                return
            if self.left:
                return
            self.answered = True
        send(self.request, self.model.respond(dict(self.outputs), self.rows))

    def advanced(self, row: int, transcript) -> None:
        """A long-form row's window is final (streaming): its text so far is sent."""
        with self.lock:
            if not self.answered:
                self.partial[row] = transcript
                self.stream(final=False)

    def stream(self, final: bool) -> None:
        """Send what became final since the last response (see `piece`); a failure to make it
        ends the stream with the request's error, never leaves it open."""
        try:
            self.piece(final)
        except Exception as exc:
            self.answered = True
            send_failure(self.request, self.model.failure(exc, "streaming a request"))

    def piece(self, final: bool) -> None:
        """The windows final from the file's start on (a long-form file: its segments so far),
        past what was sent. The text piece is the new end of the whole text decoded so far, so
        the pieces join into exactly the whole-answer text."""
        tokens: list[int] = []
        found: list[tuple] = []
        words: list[tuple] = []
        language: str | None = None
        for row in range(len(self.finished)):
            if self.finished[row]:
                window_tokens, window_segments, window_language, _, window_words = (
                    self.outputs[name][row] for name in ROW_OUTPUTS
                )
            elif row in self.partial:
                window_tokens, window_segments, window_language, _, window_words = self.model.file_outputs(
                    self.rows["options"][row], self.partial[row]
                )
            else:
                break
            tokens += window_tokens
            found += window_segments
            words += window_words or []
            language = language or window_language
            if not self.finished[row]:
                break
        text = self.model.text(tokens).decode("utf-8", errors="replace")
        piece = text[len(self.sent_text) :] if text.startswith(self.sent_text) else text
        if not piece and not final:
            return
        outputs = row_outputs(1)
        outputs["window_tokens"][0] = tokens[self.sent_tokens :]
        outputs["window_segments"][0] = found[self.sent_segments :]
        outputs["window_language"][0] = language
        outputs["window_words"][0] = words[self.sent_words :]
        self.sent_text, self.sent_tokens, self.sent_segments, self.sent_words = (
            text,
            len(tokens),
            len(found),
            len(words),
        )
        rows = {**self.rows, self.model.row_input: np.zeros((1, 1), dtype=np.int32)}
        response = self.model.respond({**outputs, "text_piece": piece}, rows)
        send(self.request, response, final)

    def failed(self, exc: Exception) -> None:
        with self.lock:
            if self.answered:
                return
            self.answered = True
        send_failure(self.request, self.model.failure(exc, "a request"))
