"""Checks encoded images before the DALI backend sees them (GPU repositories).

The DALI backend fails a whole batch when one image cannot be decoded (dali_backend #287). This
Python-backend step answers the requests it can judge from the header alone (empty, over the byte
or pixel limit, decompression bombs, formats not accepted, not an image) with their own error,
flattens transparent images onto white as transformers does, and passes the bytes on unchanged
otherwise. Parameter `image_recipe`: JSON of `tritonkit.preprocessing.image.ImageRecipe`.
"""

import numpy as np

from tritonkit.batched_model import BatchedModel
from tritonkit.errors import InputError
from tritonkit.preprocessing.image import ImageRecipe, checked_image_bytes


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        self.recipe = ImageRecipe.from_json(self.parameters["image_recipe"])
        (self.image_input,) = self.input_names
        (self.image_output,) = self.output_dtypes

    def prepare(self, inputs):
        rows = inputs[self.image_input]
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise InputError(f"{self.image_input}: empty input (shape {list(rows.shape)})", reason="empty")
        checked = np.empty(len(rows), dtype=object)
        checked[:] = [checked_image_bytes(row.tobytes(), self.recipe) for row in rows]
        return {"checked": checked}

    def run(self, batch):
        return batch  # nothing to batch: each request's rows keep their own width

    def finish(self, outputs, rows):
        checked = outputs["checked"]
        padded = np.zeros((len(checked), max(len(c) for c in checked)), dtype=np.uint8)
        for i, data in enumerate(checked):
            padded[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
        return {self.image_output: padded}
