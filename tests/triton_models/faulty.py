"""A test model on `BatchedModel` whose batches fail on chosen rows (tests/test_batch_isolation.py).

VALUE (INT32 [1]) -> DOUBLED (INT32 [1]), with an optional NOTE (STRING [1]) that only adds bytes.
`run` raises for a whole batch that holds a -1 (the culpable row); a -2 makes `finish` return
a value that cannot be cast to the output's dtype; a -3 raises an InputError from `run`; a -4 raises with a 20 KB message.
"""

import numpy as np

from tritonkit.batched_model import BatchedModel
from tritonkit.errors import InputError


class TritonPythonModel(BatchedModel):
    def run(self, batch):
        values = batch["VALUE"]
        if (values == -1).any():
            raise RuntimeError(f"poison row in a batch of {len(values)}")
        if (values == -3).any():
            raise InputError("VALUE: -3 is refused by run", reason="bad_option")
        if (values == -4).any():
            raise RuntimeError("x" * 20_000)
        return {"DOUBLED": values * 2}

    def finish(self, outputs, rows):
        if (rows["VALUE"] == -2).any():
            return {"DOUBLED": np.array([["not a number"]], dtype=object)}
        return outputs
