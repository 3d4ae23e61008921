"""Qwen-VL images -> patches, as the checkpoint's own image processor makes them.

Inputs (exactly one): IMAGE (UINT8 [-1], one encoded image, as LLaVA's ensembles take it) or
IMAGES (BYTES [-1], 1 to `max_images` encoded images, in the order their {type: image} parts come
in MESSAGES, or all before PROMPT). One conversation per request. Outputs: PATCHES
[patches of all its images, channels * temporal patch * patch²] and GRID_THW [images, 3], from the
image processor saved in `image_processor_dir` (smart_resize within its min/max pixels,
normalisation, temporal x spatial patches). Every image is checked first (`image_recipe`: bytes,
pixels, formats); a bad one fails its own request with a message naming it (IMAGES[k]).
"""

import numpy as np

from tritonkit.errors import InputError
from tritonkit.preprocessing.image import ImageRecipe, decode_image
from tritonkit.runtime import BatchedModel, object_rows


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(
            str(self.version_dir / self.parameters["image_processor_dir"])
        )
        self.recipe = ImageRecipe.from_json(self.parameters["image_recipe"])
        self.max_images = int(self.parameters["max_images"])
        self.image_input, self.images_input = self.input_names
        self.patches_output, self.grid_output = self.output_dtypes

    def encoded_images(self, inputs) -> tuple[str, list[bytes]]:
        given = [name for name in (self.image_input, self.images_input) if name in inputs]
        if len(given) != 1:
            raise InputError(
                f"{self.image_input} or {self.images_input}: give exactly one ({self.image_input}: one encoded "
                f"image; {self.images_input}: 1 to {self.max_images} encoded images)",
                reason="bad_option",
            )
        (name,) = given
        value = inputs[name]
        if value.ndim != 2 or value.shape[0] != 1:
            raise InputError(f"{name}: one conversation per request (shape [1, ...]), got {list(value.shape)}")
        if name == self.image_input:
            return name, [value[0].tobytes()]
        files = [item if isinstance(item, bytes) else bytes(item) for item in value[0]]
        if not 1 <= len(files) <= self.max_images:
            raise InputError(
                f"{name}: 1 to {self.max_images} images per request, got {len(files)}", reason="bad_option"
            )
        return name, files

    def prepare(self, inputs):
        name, files = self.encoded_images(inputs)
        images = []
        for k, data in enumerate(files):
            try:
                images.append(decode_image(data, self.recipe))
            except InputError as exc:
                where = name if name == self.image_input else f"{name}[{k}]"
                raise InputError(str(exc).replace("IMAGE:", f"{where}:", 1), reason=exc.reason) from None
        processed = self.processor(images=images, return_tensors="np")
        return {
            "patches": object_rows([np.asarray(processed["pixel_values"], dtype=np.float32)]),
            "grids": object_rows([np.asarray(processed["image_grid_thw"], dtype=np.int64)]),
        }

    def run(self, batch):
        return batch

    def finish(self, outputs, rows):
        return {self.patches_output: outputs["patches"][0][None], self.grid_output: outputs["grids"][0][None]}
