"""Silero VAD: speech probabilities of 16 kHz audio, one per 512 samples (see `tritonkit.vad`).

Input `VAD_SAMPLES` (FP32 [-1], one file per request row); output `SPEECH_PROBS` (FP32 [-1]).
Called by the Whisper preprocessing (Triton's BLS) for requests with VAD_FILTER. File:
silero_vad.onnx, from the faster-whisper wheel (MIT).
"""

import numpy as np

from tritonkit import vad
from tritonkit.batched_model import BatchedModel


class TritonPythonModel(BatchedModel):
    def setup(self):
        self.session = vad.session(self.version_dir / "silero_vad.onnx")
        (self.samples_input,) = self.input_names
        (self.probs_output,) = self.output_dtypes

    def prepare(self, inputs):
        probs = np.empty(len(inputs[self.samples_input]), dtype=object)
        probs[:] = [vad.speech_probabilities(self.session, row) for row in inputs[self.samples_input]]
        return {"probs": probs}

    def run(self, batch):
        return batch

    def finish(self, outputs, rows):
        width = max(len(p) for p in outputs["probs"])
        probs = np.zeros((len(outputs["probs"]), width), dtype=np.float32)
        for i, p in enumerate(outputs["probs"]):
            probs[i, : len(p)] = p
        return {self.probs_output: probs}
