"""Encoded image bytes (UINT8 [-1], one image per row) -> normalized pixels.

Parameter `recipe`: the JSON of `tritonkit.preprocessing.image.ImageRecipe`. Rows may be
zero-padded at the end; image decoders ignore bytes after the end of the image.
"""

import numpy as np

from tritonkit.batched_model import BatchedModel
from tritonkit.errors import InputError
from tritonkit.preprocessing.image import ImageRecipe, image_bytes_to_pixels


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        self.recipe = ImageRecipe.from_json(self.parameters["recipe"])
        (self.image_input,) = self.input_names
        (self.pixels_output,) = self.output_dtypes

    def prepare(self, inputs):
        rows = inputs[self.image_input]
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise InputError(f"{self.image_input}: empty input (shape {list(rows.shape)})", reason="empty")
        pixels = [image_bytes_to_pixels(row.tobytes(), self.recipe) for row in rows]
        return {self.pixels_output: np.stack(pixels)}

    def run(self, batch):
        return batch
