"""Strings (TYPE_STRING [1]) -> token ids (and an attention mask), with the model's own tokenizer.

Parameters: `tokenizer_dir` (in the version dir), `max_length`. Pads and truncates to
`max_length`, as the text encoder was exported for. Outputs are ids, then the mask when the
config has a second output (CLIP; SigLIP's text tower takes none).
"""

import numpy as np

from tritonkit.batched_model import BatchedModel, string_rows


class TritonPythonModel(BatchedModel):
    metrics_role = "preprocess"

    def setup(self):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.version_dir / self.parameters["tokenizer_dir"]))
        self.max_length = int(self.parameters["max_length"])
        (self.text_input,) = self.input_names
        self.ids_output, *self.mask_output = self.output_dtypes

    def prepare(self, inputs):
        texts = string_rows(inputs[self.text_input], self.text_input)
        return {self.text_input: np.array(texts, dtype=object)}

    def run(self, batch):
        texts = list(batch[self.text_input])
        encoded = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
            return_attention_mask=bool(self.mask_output),
        )
        outputs = {self.ids_output: encoded["input_ids"]}
        for name in self.mask_output:
            outputs[name] = encoded["attention_mask"]
        return outputs
