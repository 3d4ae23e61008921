"""Whisper's decoder: a whole dynamic batch of windows decoded together with a KV cache (greedy,
sampled at a TEMPERATURE, or with OpenAI's temperature fallback; see WindowDecoder).

Inputs: encoder hidden states, `WINDOW_ROW` (the request row each window belongs to) and
`DECODE_OPTIONS` (each window's options, checked by the preprocessing model). Outputs, one row per
request row: the text, its tokens (windows joined in order; padded with -1) and the language of
its first window. Windows the fallback judged silent give no text and no segments. Parameter `providers`: ONNX Runtime execution providers, comma-separated
(default CPUExecutionProvider; GPU repositories ask for CUDA first). Files: cross_kv.onnx, step.onnx, tokenizer/. Parameter `decode_settings`: the JSON
of `tritonkit.whisper_decoding.DecodeSettings`.
"""

import numpy as np

from tritonkit.runtime import BatchedModel
from tritonkit.whisper_decoding import DecodeOptions, DecodeSettings, WindowDecoder, compression_ratio, segments


class TritonPythonModel(BatchedModel):
    metrics_role = "decoder"

    def setup(self):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(self.parameters.get("intra_op_threads", "0"))

        providers = self.parameters.get("providers", "CPUExecutionProvider").split(",")
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(
                f"{self.model_name}: ONNX Runtime here lacks {', '.join(missing)}; this repository was built with "
                "--target gpu: run it on a GPU machine with onnxruntime-gpu, or rebuild with --target cpu"
            )

        def session(name):
            return ort.InferenceSession(str(self.version_dir / name), options, providers=providers)

        self.settings = DecodeSettings.from_json(self.parameters["decode_settings"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.version_dir / self.parameters["tokenizer_dir"]))
        self.decoder = WindowDecoder(
            session("cross_kv.onnx"),
            session("step.onnx"),
            self.settings,
            prompt_ids=lambda text: [int(t) for t in self.tokenizer.get_prompt_ids(text)],
            text_of=lambda tokens: self.text(tokens).decode(),
        )
        self.hidden_input, self.row_input, self.options_input = self.input_names
        self.text_output, self.tokens_output, self.language_output, *segment_outputs = self.output_dtypes
        self.segment_outputs = segment_outputs  # SEGMENT_TIMES, SEGMENT_TEXTS (absent in older repositories)

    def prepare(self, inputs):
        options = np.empty(len(inputs[self.options_input]), dtype=object)
        options[:] = [DecodeOptions.from_json(raw) for raw in inputs[self.options_input].reshape(-1)]
        return {**inputs, "options": options}

    def run(self, batch):
        tokens, languages = self.decoder.decode(batch[self.hidden_input], list(batch["options"]))
        window_tokens = np.empty(len(tokens), dtype=object)
        window_tokens[:] = [[] if skipped else t for t, skipped in zip(tokens, self.decoder.skipped)]
        return {
            "window_tokens": window_tokens,
            "window_language": np.array(languages, dtype=object),
            "window_steps": np.array(self.decoder.steps_per_window, dtype=np.int64),
            "window_sum_logprob": np.array(self.decoder.sum_logprobs, dtype=np.float64),
            "window_no_speech": np.array(self.decoder.no_speech_probs, dtype=np.float64),
            "window_temperature": np.array(self.decoder.temperatures, dtype=np.float64),
            "options": batch["options"],
        }

    def finish(self, outputs, rows):
        owners = rows[self.row_input].reshape(-1)
        count = int(owners.max()) + 1
        joined = [[] for _ in range(count)]
        languages = [b""] * count
        for owner, tokens, language in zip(owners, outputs["window_tokens"], outputs["window_language"]):
            if not languages[owner]:
                languages[owner] = language.encode()
            joined[owner].extend(tokens)
        width = max(1, max(len(t) for t in joined))
        token_array = np.full((count, width), -1, dtype=np.int64)
        for i, t in enumerate(joined):
            token_array[i, : len(t)] = t
        begin = self.settings.timestamp_begin
        texts = [self.text(t) for t in joined]
        self.metrics.decoded(tokens=sum(len(t) for t in joined), steps=int(outputs["window_steps"].sum()))
        response = {
            self.text_output: np.array(texts, dtype=object)[:, None],
            self.tokens_output: token_array,
            self.language_output: np.array(languages, dtype=object)[:, None],
        }
        if self.segment_outputs:
            found: list[list[tuple[float, float, list[int], tuple[float, ...]]]] = [[] for _ in range(count)]
            windows = zip(
                owners,
                outputs["window_tokens"],
                outputs["options"],
                outputs["window_sum_logprob"],
                outputs["window_no_speech"],
                outputs["window_temperature"],
            )
            for owner, tokens, options, sum_logprob, no_speech, temperature in windows:
                if options.timestamps and begin is not None:
                    # OpenAI's per-window figures, shared by the window's segments
                    stats = (
                        sum_logprob / (len(tokens) + 1),
                        compression_ratio(self.text(tokens).decode()),
                        no_speech,
                        temperature,
                    )
                    found[owner] += [
                        (*options.original_span(start, end), text, stats)
                        for start, end, text in segments(tokens, begin, options.offset_s, options.duration_s)
                    ]
            most = max(1, max(len(f) for f in found))
            times = np.full((count, most, 2), -1.0, dtype=np.float32)
            texts_array = np.full((count, most), b"", dtype=object)
            stats_array = np.zeros((count, most, 4), dtype=np.float32)
            for i, row in enumerate(found):
                for k, (start, end, text, stats) in enumerate(row):
                    times[i, k] = (start, end)
                    texts_array[i, k] = self.text(text)
                    stats_array[i, k] = stats
            names = dict(zip(("times", "texts", "stats"), self.segment_outputs))
            response[names["times"]], response[names["texts"]] = times, texts_array
            if "stats" in names:
                response[names["stats"]] = stats_array
        return response

    def text(self, tokens) -> bytes:
        """Decoded text without timestamp tokens, stripped."""
        begin = self.settings.timestamp_begin
        kept = [t for t in tokens if begin is None or t < begin]
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip().encode()
