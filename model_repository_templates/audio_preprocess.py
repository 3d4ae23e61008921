"""Encoded audio bytes (UINT8 [-1], one file per row) -> Whisper log-mel windows.

Each row becomes one or more 30 s windows; `WINDOW_ROW` tells the decoder which row each window
came from. Parameter `recipe`: the JSON of `tritonkit.preprocessing.audio.AudioRecipe`; the
model's mel filters are `mel_filters.npy` in the version directory.
"""

import numpy as np

from tritonkit.errors import InputError
from tritonkit.preprocessing.audio import AudioRecipe, decode_audio, log_mel, split_windows
from tritonkit.runtime import BatchedModel


class TritonPythonModel(BatchedModel):
    def setup(self):
        self.recipe = AudioRecipe.from_json(self.parameters["recipe"])
        self.mel_filters = np.load(self.version_dir / "mel_filters.npy")
        (self.audio_input,) = self.input_names
        self.features_output, self.row_output = self.output_dtypes
        self.max_windows = int(self.model_config["max_batch_size"])

    def prepare(self, inputs):
        rows = inputs[self.audio_input]
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise InputError(f"{self.audio_input}: empty input (shape {list(rows.shape)})")
        windows, owners = [], []
        for index, row in enumerate(rows):
            pieces = split_windows(decode_audio(row.tobytes(), self.recipe), self.recipe)
            windows += pieces
            owners += [index] * len(pieces)
        if len(windows) > self.max_windows:
            raise InputError(
                f"{self.audio_input}: {len(windows)} windows of 30 s in one request exceed the limit of "
                f"{self.max_windows}; send fewer or shorter files per request"
            )
        return {
            self.features_output: log_mel(windows, self.mel_filters),
            self.row_output: np.array(owners, dtype=np.int32)[:, None],
        }

    def run(self, batch):
        return batch
