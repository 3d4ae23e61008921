"""Qwen-VL images -> patches, as the checkpoint's own image processor makes them.

Inputs (exactly one): IMAGE (UINT8 [-1], one encoded image, as LLaVA's ensembles take it) or
IMAGES (BYTES [-1], 1 to `max_images` encoded images, in the order their {type: image} parts come
in MESSAGES, or all before PROMPT); PROMPT and MESSAGES come only so that a turn without images reaches
this model and fails with a message saying so. One conversation per request. Outputs: PATCHES
[patches of all its images, channels * temporal patch * patch²] and GRID_THW [images, 3].

Every image is checked from its header first (`image_recipe`: bytes, pixels, formats); a bad one
fails its own request with a message naming it (IMAGES[k]). Then either
- `model.dali` (`--preprocessing dali`, the default): every image of the batch's requests in one
  DALI pipeline (decode, resize to the processor's smart_resize size, normalise, patches), its
  size computed here from the header (`patch_recipe`); `rows_per_run` images a pipeline run;
- or the image processor saved in `image_processor_dir` (`--preprocessing python`: PIL, equal to
  transformers).
"""

import numpy as np

from tritonkit.batched_model import ROW_ERRORS, BatchedModel, object_rows
from tritonkit.errors import InputError
from tritonkit.preprocessing.image import ImageRecipe, decode_image

DEFAULT_IMAGES_PER_RUN = 8


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        self.recipe = ImageRecipe.from_json(self.parameters["image_recipe"])
        self.max_images = int(self.parameters["max_images"])
        self.image_input, self.images_input, *_ = self.input_names  # then PROMPT, MESSAGES
        self.patches_output, self.grid_output = self.output_dtypes
        pipeline = self.version_dir / "model.dali"
        self.runner = self.processor = None
        if pipeline.exists():
            from tritonkit.preprocessing.dali import DaliRunner
            from tritonkit.qwen_vl import PatchRecipe

            self.patch_recipe = PatchRecipe.from_json(self.parameters["patch_recipe"])
            self.runner = DaliRunner(
                pipeline.read_bytes(),
                max_batch_size=int(self.parameters.get("rows_per_run") or DEFAULT_IMAGES_PER_RUN),
                num_threads=int(self.parameters.get("num_threads", "1")),
                device_id=self.device_id,  # a GPU repository's pipeline has GPU operators
            )
        else:
            from transformers import AutoImageProcessor

            self.processor = AutoImageProcessor.from_pretrained(
                str(self.version_dir / self.parameters["image_processor_dir"])
            )

    def encoded_images(self, inputs) -> tuple[str, list[bytes]]:
        given = [name for name in (self.image_input, self.images_input) if name in inputs]
        if not given:
            raise InputError(
                f"{self.image_input} or {self.images_input}: none given; every turn to this ensemble needs an image "
                f"({self.image_input}: one encoded image; {self.images_input}: 1 to {self.max_images}); "
                "send a turn without images to NAME_chat_text",
                reason="bad_option",
            )
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
        labels = [name] if name == self.image_input else [f"{name}[{k}]" for k in range(len(files))]
        images = []
        for label, data in zip(labels, files):
            try:
                images.append(self.checked(data))
            except InputError as exc:
                raise InputError(str(exc).replace("IMAGE:", f"{label}:", 1), reason=exc.reason) from None
        if self.runner is not None:
            return {"images": object_rows([images]), "labels": object_rows([labels])}
        processed = self.processor(images=images, return_tensors="np")
        return {
            "patches": object_rows([np.asarray(processed["pixel_values"], dtype=np.float32)]),
            "grids": object_rows([np.asarray(processed["image_grid_thw"], dtype=np.int64)]),
        }

    def checked(self, data: bytes):
        """DALI: (resized size, bytes to decode) from the header; the processor: the decoded image."""
        if self.runner is None:
            return decode_image(data, self.recipe)
        from tritonkit.preprocessing.dali import resized_image

        return resized_image(self.patch_recipe, self.recipe, data)

    def run(self, batch):
        if self.runner is None:
            return batch
        from tritonkit.preprocessing.dali import RowFailed
        from tritonkit.qwen_vl import RESIZED_SIZE

        images = [image for request in batch["images"] for image in request]
        results = iter(
            self.runner.run({"IMAGE": [data for _, data in images], RESIZED_SIZE: [size for size, _ in images]})
        )
        patches, grids = [], []
        errors = np.full(len(batch["images"]), None, dtype=object)
        for i, (request, labels) in enumerate(zip(batch["images"], batch["labels"])):
            mine = [next(results) for _ in request]
            failed = [(label, r) for label, r in zip(labels, mine) if isinstance(r, RowFailed)]
            if failed:
                label, reason = failed[0]
                errors[i] = InputError(f"{label}: not decodable ({reason})", reason="undecodable")
                patches.append(None)
                grids.append(None)
                continue
            patches.append(np.concatenate([r[0] for r in mine]))
            grids.append(np.asarray([self.patch_recipe.grid(*size) for size, _ in request], dtype=np.int64))
        return {"patches": object_rows(patches), "grids": object_rows(grids), ROW_ERRORS: errors}

    def finish(self, outputs, rows):
        return {self.patches_output: outputs["patches"][0][None], self.grid_output: outputs["grids"][0][None]}
