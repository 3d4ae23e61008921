"""The common body of tritonkit's Python-backend models: one batched call per `execute`.

Triton hands `execute` every request the dynamic batcher merged. `BatchedModel` turns each request
into rows (`prepare`), runs one call over all rows (`run`), and splits the result back. A request
whose input is bad gets its own error response; its batch mates still succeed.

This module is imported inside the Python-backend stub, where `triton_python_backend_utils`
exists; it is imported lazily so the pure parts stay testable anywhere.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Mapping

import numpy as np

from tritonkit.dtypes import numpy_dtype
from tritonkit.errors import InputError
from tritonkit.model_metrics import ModelMetrics

LOGGER = logging.getLogger("tritonkit.runtime")
# `run` may return this key: an object array with one entry per row, None or the message of a row
# that failed; a request with a failed row gets that message as its error response.
ROW_ERRORS = "__row_errors__"


def split_rows(batch: Mapping[str, np.ndarray], counts: list[int]) -> list[dict[str, np.ndarray]]:
    """Split arrays whose first axis holds sum(counts) rows into one dict per request."""
    parts: list[dict[str, np.ndarray]] = [{} for _ in counts]
    offsets = np.cumsum([0, *counts])
    for name, array in batch.items():
        if len(array) != offsets[-1]:
            raise RuntimeError(f"output {name} has {len(array)} rows, expected {offsets[-1]}")
        for i in range(len(counts)):
            parts[i][name] = array[offsets[i] : offsets[i + 1]]
    return parts


def concat_rows(rows: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    names = rows[0].keys()
    return {name: np.concatenate([r[name] for r in rows], axis=0) for name in names}


def string_rows(array: np.ndarray, tensor: str) -> list[str]:
    """Decode a TYPE_STRING tensor [B, 1] to str, rejecting text that is not UTF-8."""
    texts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(f"{tensor}: not valid UTF-8 text ({exc.reason} at byte {exc.start})", reason="bad_text") from None
    return texts


def encoded_size(array: np.ndarray) -> int | None:
    """Bytes of an encoded input (UINT8 rows or strings); None for numeric tensors."""
    if array.dtype == np.uint8:
        return int(array.nbytes)
    if array.dtype == object:
        return sum(len(item) if isinstance(item, (bytes, str)) else 0 for item in array.reshape(-1))
    return None


class BatchedModel:
    """Base of tritonkit's `TritonPythonModel` classes."""

    metrics_role = ""  # "preprocess" or "decoder": which of tritonkit.model_metrics this model reports

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.model_config.get("name", "?"))
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.parameters = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_dtypes = {o["name"]: numpy_dtype(o["data_type"]) for o in self.model_config["output"]}
        self.metrics = ModelMetrics(self.model_name, self.metrics_role)
        self.setup()

    def setup(self) -> None:
        """Load what the model needs (sessions, tokenizers) from `self.version_dir`."""

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's inputs -> rows to batch. Raise InputError for a bad request."""
        return inputs

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All rows -> outputs with the same number of rows (plus ROW_ERRORS for rows that failed)."""
        raise NotImplementedError

    def finish(self, outputs: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's share of `run`'s outputs -> its response tensors (e.g. regroup rows)."""
        return outputs

    def read_inputs(self, request) -> dict[str, np.ndarray]:
        """A request's inputs by name (optional inputs it left out are absent)."""
        import triton_python_backend_utils as pb_utils

        inputs = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        return inputs

    def prepare_request(self, request):
        """One request's rows, or the TritonError to answer it with (a bad input fails it alone)."""
        import triton_python_backend_utils as pb_utils

        try:
            inputs = self.read_inputs(request)
            first = inputs.get(self.input_names[0])
            size = encoded_size(first) if first is not None else None
            if size is not None:
                self.metrics.received(self.input_names[0], size)
            return self.prepare(inputs)
        except InputError as exc:
            self.metrics.rejected(exc.reason)
            return pb_utils.TritonError(str(exc))
        except Exception as exc:  # a bug must not take the batch down either
            LOGGER.error("%s: unexpected error preparing a request:\n%s", self.model_name, traceback.format_exc())
            return pb_utils.TritonError(f"{self.model_name}: internal error: {exc}")

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses: list = [None] * len(requests)
        prepared: list[tuple[int, dict[str, np.ndarray]]] = []
        seconds = [0.0] * len(requests)  # per request: its own decoding plus its share of the batch
        for index, request in enumerate(requests):
            began = time.perf_counter()
            rows = self.prepare_request(request)
            if isinstance(rows, dict):
                prepared.append((index, rows))
            else:
                responses[index] = pb_utils.InferenceResponse(error=rows)
            seconds[index] = time.perf_counter() - began
        if prepared:
            counts = [len(next(iter(rows.values()))) for _, rows in prepared]
            began = time.perf_counter()
            try:
                outputs = self.run(concat_rows([rows for _, rows in prepared]))
                per_request = split_rows(outputs, counts)
            except Exception as exc:
                LOGGER.error("%s: batch failed:\n%s", self.model_name, traceback.format_exc())
                error = pb_utils.TritonError(f"{self.model_name}: {exc}")
                per_request = [error] * len(prepared)
            batch_seconds = time.perf_counter() - began
            for (index, rows), count in zip(prepared, counts):
                seconds[index] += batch_seconds * count / sum(counts)
            for (index, rows), result in zip(prepared, per_request):
                if isinstance(result, dict) and ROW_ERRORS in result:
                    failed = [e for e in result.pop(ROW_ERRORS) if e is not None]
                    if failed:
                        self.metrics.rejected(getattr(failed[0], "reason", "invalid"))
                        result = pb_utils.TritonError(str(failed[0]))
                if isinstance(result, dict):
                    try:
                        result = self.finish(result, rows)
                    except Exception as exc:
                        LOGGER.error("%s: finishing a request failed:\n%s", self.model_name, traceback.format_exc())
                        result = pb_utils.TritonError(f"{self.model_name}: {exc}")
                if isinstance(result, dict):
                    tensors = [
                        pb_utils.Tensor(name, np.ascontiguousarray(value.astype(self.output_dtypes[name], copy=False)))
                        for name, value in result.items()
                    ]
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                else:
                    responses[index] = pb_utils.InferenceResponse(error=result)
        for request_seconds in seconds:
            self.metrics.preprocessed(request_seconds)
        return responses

    def finalize(self) -> None:
        self.metrics.close()
