"""Encoded audio bytes (UINT8 [-1], one file per row) -> 30 s windows of Whisper's input.

The first output is either log-mel features (INPUT_FEATURES, computed here with numpy) or the
windows' 16 kHz samples (WINDOW_SAMPLES) for a DALI log-mel stage. Each row becomes one or more
30 s windows; `WINDOW_ROW` tells the decoder which row each window
came from, and `DECODE_OPTIONS` carries the row's options (optional inputs LANGUAGE, TASK,
MAX_NEW_TOKENS, TIMESTAMPS, PROMPT, TEMPERATURE, FALLBACK, SEED, VAD_FILTER, BEAM_SIZE, LENGTH_PENALTY,
PATIENCE) and the window's place in its file, checked here so a bad option fails before any encoder work. Parameters: `recipe`
(JSON of `tritonkit.preprocessing.audio.AudioRecipe`) and `decode_settings` (JSON of
`tritonkit.whisper_decoding.DecodeSettings`); the mel filters are `mel_filters.npy`. With the recipe's padding "features" and DALI, WINDOW_FRAMES
tells the log-mel stage how many frames of each window hold audio. With
VAD_FILTER, the file's speech (found by the `vad_model` parameter's model, called through BLS) is
decoded instead of the whole file, and each window carries the map back to the file's timeline.
"""

from dataclasses import replace

import numpy as np

from tritonkit import vad
from tritonkit.batched_model import BatchedModel, string_rows
from tritonkit.errors import InputError
from tritonkit.preprocessing.audio import (
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    AudioRecipe,
    content_frames,
    decode_audio,
    log_mel,
    log_mel_whole,
    pad_window,
    split_windows,
)
from tritonkit.whisper_decoding import OPTION_INPUTS, DecodeOptions, DecodeSettings


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        self.recipe = AudioRecipe.from_json(self.parameters["recipe"])
        self.settings = DecodeSettings.from_json(self.parameters["decode_settings"])
        self.mel_filters = np.load(self.version_dir / "mel_filters.npy")
        self.audio_input = self.input_names[0]  # then the options of OPTION_INPUTS this build has
        self.windows_output, self.row_output, self.options_output, *rest = self.output_dtypes
        self.features_output = "FILE_FEATURES" if "FILE_FEATURES" in rest else None  # long-form files' whole features
        self.frames_output = "WINDOW_FRAMES" if "WINDOW_FRAMES" in rest else None
        self.emit_features = self.windows_output == "INPUT_FEATURES"
        self.max_windows = int(self.model_config["max_batch_size"])
        self.vad_model = self.parameters.get("vad_model")  # absent: built without faster-whisper's Silero VAD

    def row_options(self, inputs, count: int) -> list[DecodeOptions]:
        given: list[dict] = [{} for _ in range(count)]
        for name, (field, kind) in OPTION_INPUTS.items():
            if name not in inputs:
                continue
            values = inputs[name].reshape(-1)
            if len(values) != count:
                raise InputError(
                    f"{name}: {len(values)} values for {count} audio rows; give one per row", reason="bad_option"
                )
            for row, value in zip(given, string_rows(values, name) if kind is str else [kind(v) for v in values]):
                row[field] = value
        if self.vad_model is None and any(row.get("vad") for row in given):
            raise InputError(
                "VAD_FILTER: this repository has no VAD model; pip install faster-whisper "
                "(its wheel ships Silero VAD) and rebuild",
                reason="bad_option",
            )
        return [DecodeOptions(**row).validate(self.settings) for row in given]

    def speech_only(self, samples: np.ndarray) -> tuple[np.ndarray, dict]:
        """The file's speech joined (Silero VAD, faster-whisper's defaults) and how to map times back."""
        import triton_python_backend_utils as pb_utils

        request = pb_utils.InferenceRequest(
            model_name=self.vad_model,
            inputs=[pb_utils.Tensor("VAD_SAMPLES", samples.astype(np.float32)[None, :])],
            requested_output_names=["SPEECH_PROBS"],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.vad_model}: {response.error().message()}")
        probs = pb_utils.get_output_tensor_by_name(response, "SPEECH_PROBS").as_numpy()[0]
        chunks = vad.speech_chunks(probs, len(samples))
        speech_map = vad.SpeechMap.of(chunks)
        placed = {"speech_ends": speech_map.chunk_ends, "speech_silences": speech_map.silence_before_s}
        return vad.join_speech(samples, chunks), placed

    def prepare(self, inputs):
        rows = inputs[self.audio_input]
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise InputError(f"{self.audio_input}: empty input (shape {list(rows.shape)})", reason="empty")
        row_options = self.row_options(inputs, len(rows))
        windows, owners, options, file_features = [], [], [], []
        for index, row in enumerate(rows):
            samples = decode_audio(row.tobytes(), self.recipe)
            mapped: dict = {}
            if row_options[index].vad:
                samples, mapped = self.speech_only(samples)
                if not len(samples):  # no speech: one empty window, decoded to nothing
                    row_options[index] = replace(row_options[index], empty=True)
            row_options[index] = replace(row_options[index], **mapped)
            # With timestamps every file is decoded with OpenAI's sequential algorithm, as transformers'
            # generate(return_timestamps=True) decodes short files too: a window whose last segment is
            # complete before the end of its 30 s (speech cut off at the end) is decoded again from its
            # last timestamp, or the file's last words are lost. A file of <= 30 s seeks through its
            # window's own features (3000 frames, as transformers' max_frames), so the ensemble's
            # encoder output serves the decoder's first window.
            short = len(samples) <= WINDOW_SAMPLES
            if self.features_output and row_options[index].timestamps and len(samples) > 0:
                if short and self.recipe.padding == "audio":
                    features = log_mel([samples], self.mel_filters)[0]
                else:
                    features = log_mel_whole(samples, self.mel_filters, self.recipe.padding)
                row_options[index] = replace(
                    row_options[index],
                    long_form=True,
                    total_frames=features.shape[1],
                    file_s=len(samples) / SAMPLE_RATE,
                    first_window_encoded=short,
                )
                pieces = [samples[:WINDOW_SAMPLES]]
                file_features.append(features)
            else:
                pieces = split_windows(samples, self.recipe)
                file_features += [None] * len(pieces)
            windows += pieces
            owners += [index] * len(pieces)
            offset = 0
            for window, piece in enumerate(pieces):  # each window knows where it sits in its file (segment times)
                placed = replace(
                    row_options[index],
                    offset_s=offset / SAMPLE_RATE,
                    duration_s=len(piece) / SAMPLE_RATE,
                    window=window,
                )
                options.append(placed.to_json().encode())
                offset += len(piece)
        if len(windows) > self.max_windows:
            raise InputError(
                f"{self.audio_input}: {len(windows)} windows of 30 s in one request exceed the limit of "
                f"{self.max_windows}; send fewer or shorter files per request",
                reason="too_long",
            )
        prepared = {
            self.windows_output: log_mel(windows, self.mel_filters, self.recipe.padding)
            if self.emit_features
            else np.stack([pad_window(w) for w in windows]),
            self.row_output: np.array(owners, dtype=np.int32)[:, None],
            self.options_output: np.array(options, dtype=object)[:, None],
        }
        if self.frames_output:
            prepared[self.frames_output] = np.array([[content_frames(w)] for w in windows], dtype=np.int32)
        if self.features_output:
            whole = np.empty(len(windows), dtype=object)  # ragged until this request's response
            whole[:] = file_features
            prepared["file_features"] = whole
        return prepared

    def run(self, batch):
        return batch

    def finish(self, outputs, rows):
        if "file_features" not in outputs:
            return outputs
        outputs = dict(outputs)
        whole = outputs.pop("file_features")
        longest = max((f.shape[1] for f in whole if f is not None), default=0)
        features = np.zeros((len(whole), self.mel_filters.shape[1], longest), dtype=np.float32)
        for i, f in enumerate(whole):
            if f is not None:
                features[i, :, : f.shape[1]] = f
        outputs[self.features_output] = features
        return outputs
