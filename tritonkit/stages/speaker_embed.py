"""Audio files -> speaker embeddings: resemblyzer's preprocessing and its encoder, for a batch.

Input: AUDIO (UINT8 [-1], one encoded file per row). Output: AUDIO_EMBEDS [embedding size], the
utterance's embedding (the mean of its partial utterances' embeddings, L2-normalised, as
`VoiceEncoder.embed_utterance` returns it). Every file is preprocessed here
(`tritonkit.preprocessing.voice`); the partials of every file in the batch run through the graph
together, in runs of at most `rows_per_run` partials (0: all at once). A file with no voice, or
one that does not decode, fails its own request. Parameters: `recipe` (JSON of VoiceRecipe),
`model_file`, `engine`, `inference_precision`, `intra_op_threads` (as onnx_encoder), `providers`
(ONNX Runtime's; a GPU repository's start with CUDAExecutionProvider), `rows_per_run`.
"""

import itertools

import numpy as np

from tritonkit.batched_model import BatchedModel, object_rows, run_in_slices
from tritonkit.errors import InputError
from tritonkit.preprocessing.voice import VoiceRecipe, average, file_partials, mel_filters


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        from tritonkit.engines import onnxruntime_providers

        graph = self.parameters.get("model_file", "model.onnx")
        providers = onnxruntime_providers(self.parameters, self.model_name)
        self.session = self.open_session(self.version_dir / graph, providers=providers)
        self.graph_input = self.session.get_inputs()[0].name
        self.graph_output = self.session.get_outputs()[0].name
        self.recipe = VoiceRecipe.from_json(self.parameters["recipe"])
        self.filters = mel_filters()
        self.rows_per_run = int(self.parameters.get("rows_per_run", "0"))
        (self.audio_input,) = self.input_names
        (self.embeds_output,) = self.output_dtypes

    def prepare(self, inputs):
        rows = inputs[self.audio_input]
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise InputError(f"{self.audio_input}: empty input (shape {list(rows.shape)})", reason="empty")
        cut = [file_partials(row.tobytes(), self.filters, self.recipe) for row in rows]
        return {"partials": object_rows(cut)}

    def run(self, batch):
        files = list(batch["partials"])
        counts = [len(p) for p in files]
        feed = {self.graph_input: np.concatenate(files).astype(np.float32)}
        (embedded,) = run_in_slices(lambda part: self.session.run([self.graph_output], part), feed, self.rows_per_run)
        bounds = np.cumsum([0, *counts])
        embeds = np.stack([average(embedded[a:b]) for a, b in itertools.pairwise(bounds)])
        return {self.embeds_output: embeds}
