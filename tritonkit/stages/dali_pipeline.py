"""A serialized DALI pipeline (`model.dali`) run with DALI's CPU operators inside the Python backend.

This is the CPU stand-in for the DALI backend: the file is the one `tritonkit.preprocessing.dali`
serialized from the same definition that a GPU repository ships. Inputs feed the pipeline's
external sources of the same names; outputs are the pipeline's outputs in config order.

Parameters: `num_threads` (DALI CPU threads), `rows_per_run` (the pipeline's batch size: a batch runs
in slices of that many rows, which bounds DALI's per-sample buffers; default the max batch size), `image_recipe` (optional JSON of
`tritonkit.preprocessing.image.ImageRecipe`: checks each encoded image first, so size limits,
formats and bombs fail per request with a message), `warmup` (optional JSON {input: largest
shape}: one run of zeros of each input's type at load, so the pipeline's buffers are at their largest from the start
instead of growing over hours as ever longer inputs arrive). A row DALI cannot decode fails its
request alone: the batch is rerun without it.
"""

import json

import numpy as np

from tritonkit.batched_model import ROW_ERRORS, BatchedModel
from tritonkit.dtypes import numpy_dtype
from tritonkit.errors import InputError
from tritonkit.preprocessing.dali import DaliRunner, RowFailed
from tritonkit.preprocessing.image import ImageRecipe, checked_image_bytes


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        self.runner = DaliRunner(
            (self.version_dir / "model.dali").read_bytes(),
            max_batch_size=int(self.parameters.get("rows_per_run") or self.model_config["max_batch_size"]),
            num_threads=int(self.parameters.get("num_threads", "1")),
        )
        recipe = self.parameters.get("image_recipe")
        self.image_recipe = ImageRecipe.from_json(recipe) if recipe else None
        self.first_input = self.input_names[0]
        warmup = json.loads(self.parameters.get("warmup") or "{}")
        if warmup:
            rows = self.runner.max_batch_size
            dtypes = {i["name"]: numpy_dtype(i["data_type"]) for i in self.model_config["input"]}
            self.runner.run({name: [np.zeros(shape, dtypes[name])] * rows for name, shape in warmup.items()})

    def prepare(self, inputs):
        if self.image_recipe is None:
            return inputs
        rows = inputs[self.first_input]
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise InputError(f"{self.first_input}: empty input (shape {list(rows.shape)})", reason="empty")
        checked = np.empty(len(rows), dtype=object)
        checked[:] = [
            np.frombuffer(checked_image_bytes(row.tobytes(), self.image_recipe), dtype=np.uint8) for row in rows
        ]
        return {self.first_input: checked}

    def run(self, batch):
        results = self.runner.run({name: list(batch[name]) for name in self.input_names})
        good = next((r for r in results if not isinstance(r, RowFailed)), None)
        errors = np.full(len(results), None, dtype=object)
        outputs = {}
        for position, name in enumerate(self.output_dtypes):
            rows = []
            for i, result in enumerate(results):
                if isinstance(result, RowFailed):
                    errors[i] = InputError(f"{self.first_input}: not decodable ({result})", reason="undecodable")
                    rows.append(np.zeros_like(good[position]) if good is not None else np.zeros(1, np.float32))
                else:
                    rows.append(result[position])
            outputs[name] = np.stack(rows)
        return {**outputs, ROW_ERRORS: errors}
