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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonkit.dtypes import numpy_dtype
from tritonkit.errors import InputError, bounded
from tritonkit.model_metrics import ModelMetrics
from tritonkit.repository_format import FORMAT_PARAMETER, format_error

LOGGER = logging.getLogger("tritonkit.batched_model")
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


def concat_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    names = rows[0].keys()
    return {name: np.concatenate([r[name] for r in rows], axis=0) for name in names}


def run_in_slices(run, feed: Mapping[str, np.ndarray], rows_per_run: int) -> list[np.ndarray]:
    """`run(feed)`'s outputs, computed `rows_per_run` rows at a time and written into one array
    each: a runtime that keeps its high-water mark (ONNX Runtime's arena) then holds one slice's
    worth, not the largest batch's. 0, or a batch no larger, runs it whole."""
    rows = len(next(iter(feed.values())))
    if not rows_per_run or rows <= rows_per_run:
        return list(run(feed))
    outputs: list[np.ndarray] = []
    for start in range(0, rows, rows_per_run):
        parts = run({name: value[start : start + rows_per_run] for name, value in feed.items()})
        if not outputs:
            outputs = [np.empty((rows, *part.shape[1:]), dtype=part.dtype) for part in parts]
        for output, part in zip(outputs, parts):
            output[start : start + rows_per_run] = part
    return outputs


def object_rows(values) -> np.ndarray:
    """One row per value, whatever its shape: ragged rows (a request's patches, its prompt ids)
    batch as objects."""
    rows = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        rows[i] = value
    return rows


def string_rows(array: np.ndarray, tensor: str) -> list[str]:
    """Decode a TYPE_STRING tensor [B, 1] to str, rejecting text that is not UTF-8."""
    texts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{tensor}: not valid UTF-8 text ({exc.reason} at byte {exc.start})", reason="bad_text"
            ) from None
    return texts


def encoded_size(array: np.ndarray) -> int | None:
    """Bytes of an encoded input (UINT8 rows or strings); None for numeric tensors."""
    if array.dtype == np.uint8:
        return int(array.nbytes)
    if array.dtype == object:
        return sum(len(item) if isinstance(item, (bytes, str)) else 0 for item in array.reshape(-1))
    return None


@dataclass(frozen=True)
class Failure:
    """Why one request failed. `client`: its own input was bad (an InputError), answered with
    Triton's INVALID_ARG code (a 400 through the OpenAI gateway); otherwise INTERNAL (a bug)."""

    message: str
    client: bool

    def error(self):
        import triton_python_backend_utils as pb_utils

        code = getattr(pb_utils.TritonError, "INVALID_ARG" if self.client else "INTERNAL", None)
        return pb_utils.TritonError(self.message) if code is None else pb_utils.TritonError(self.message, code)


def send_final(request, response) -> None:
    """Answer `request` through its response sender: the one, final response a non-decoupled
    model may send that way."""
    import triton_python_backend_utils as pb_utils

    request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class BatchedModel:
    """Base of tritonkit's `TritonPythonModel` classes."""

    metrics_role = ""  # "preprocess" or "decoder": which of tritonkit.model_metrics this model reports
    # `run` may answer requests before the batch ends (`release`): every response then goes through
    # the request's response sender (one final response each, as a non-decoupled model may send)
    early_responses = False

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.model_config.get("name", "?"))
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.parameters = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        stale = format_error(self.model_name, self.parameters.get(FORMAT_PARAMETER))
        if stale is not None:  # the load fails with it (tritonkit serve prints it)
            raise stale
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_dtypes = {o["name"]: numpy_dtype(o["data_type"]) for o in self.model_config["output"]}
        self.metrics = ModelMetrics(self.model_name, self.metrics_role, args.get("model_instance_name", ""))
        # KIND_GPU instances: the GPU this instance runs on (Triton's args); None on CPU
        self.device_id = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None
        # early responses: the batch being run (request, rows, first row, rows) and the positions in
        # it already answered by `release`
        self._batch: list[tuple[Any, dict[str, np.ndarray], int, int]] | None = None
        self._answered: set[int] = set()
        self.setup()
        self.metrics.resident()

    def setup(self) -> None:
        """Load what the model needs (sessions, tokenizers) from `self.version_dir`."""

    def open_session(self, path: Path, **kwargs):
        """An ONNX Runtime or OpenVINO session for the graph at `path`, as this model's parameters
        say (`tritonkit.engines.session_from_parameters`), its threads reported."""
        from tritonkit.engines import instance_threads, session_from_parameters

        session = session_from_parameters(path, self.parameters, self.model_config, **kwargs)
        threads = instance_threads(self.parameters, self.model_config)
        self.metrics.compute_threads(self.parameters.get("engine", "onnxruntime"), threads)
        return session

    def torch_threads(self) -> int:
        """Give torch this instance's share of the cores (`tritonkit.engines.instance_threads`),
        report it (`tritonkit_compute_threads`) and return it."""
        import torch

        from tritonkit.engines import instance_threads

        torch.set_num_threads(instance_threads(self.parameters, self.model_config))
        try:
            torch.set_num_interop_threads(1)  # one model call at a time per instance
        except RuntimeError:  # already set, or inter-op work has started in this process
            pass
        self.metrics.compute_threads("torch", torch.get_num_threads())
        return torch.get_num_threads()

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

    def request_bytes(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Reject a request whose encoded inputs (bytes, strings) exceed `max_request_bytes`."""
        limit = self.parameters.get("max_request_bytes")
        if not limit:
            return
        total = sum(size for size in map(encoded_size, inputs.values()) if size is not None)
        if total > int(limit):
            raise InputError(
                f"request: {total} bytes of input exceed the {int(limit)} byte limit "
                "(max_request_bytes; rebuild with --max-request-bytes to change it)",
                reason="too_large",
            )

    def prepare_request(self, request):
        """One request's rows, or the Failure to answer it with (a bad input fails it alone)."""
        try:
            inputs = self.read_inputs(request)
            first = inputs.get(self.input_names[0])
            size = encoded_size(first) if first is not None else None
            if size is not None:
                self.metrics.received(self.input_names[0], size)
            self.request_bytes(inputs)
            return self.prepare(inputs)
        except Exception as exc:  # a bug must not take the batch down either
            return self.failure(exc, "preparing a request")

    def failure(self, exc: Exception, doing: str) -> Failure:
        """What one request is failed with; an InputError is the client's, anything else a bug."""
        if isinstance(exc, InputError):
            self.metrics.rejected(exc.reason)
            return Failure(bounded(str(exc)), client=True)
        LOGGER.error("%s: %s failed:\n%s", self.model_name, doing, traceback.format_exc())
        return Failure(bounded(f"{self.model_name}: {exc}"), client=False)

    def release(self, outputs: Mapping[str, np.ndarray], ready: np.ndarray) -> None:
        """From inside `run`: answer now every request of the batch whose rows are all `ready`
        (outputs: batch-length arrays, filled where ready), so its batch mates' longer work (a
        fallback re-decode) does not hold it up. Without early responses, nothing happens."""
        if self._batch is None:
            return
        for position, (request, rows, start, count) in enumerate(self._batch):
            if position in self._answered or not ready[start : start + count].all():
                continue
            send_final(request, self.respond({name: a[start : start + count] for name, a in outputs.items()}, rows))
            self._answered.add(position)

    def run_requests(self, groups: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | Failure]:
        """`run` over every request's rows at once -> per request its outputs or its Failure.

        When the batch fails, each request is run again alone, so only the culpable one fails and
        with its own message (an exception from the combined batch names none of them)."""
        counts = [len(next(iter(rows.values()))) for rows in groups]
        try:
            return list(split_rows(self.run(concat_rows(groups)), counts))
        except Exception as exc:
            if len(groups) == 1:
                return [self.failure(exc, "a request")]
            LOGGER.warning(
                "%s: a batch of %d requests failed (%s); running them one by one",
                self.model_name,
                len(groups),
                bounded(str(exc), 200),
            )
        results: list[dict[str, np.ndarray] | Failure] = []
        answered, self._batch = set(self._answered), None  # alone: answered at the end
        for position, (rows, count) in enumerate(zip(groups, counts)):
            if position in answered:  # released before the batch failed
                results.append(Failure("answered already", client=False))
                continue
            try:
                results.append(split_rows(self.run(rows), [count])[0])
            except Exception as exc:
                results.append(self.failure(exc, "a request"))
        return results

    def respond(self, result, rows: dict[str, np.ndarray]):
        """One request's response: its tensors, or an error of its own (never one shared with batch mates)."""
        import triton_python_backend_utils as pb_utils

        if isinstance(result, dict):
            try:
                failed = [e for e in result.pop(ROW_ERRORS, ()) if e is not None]
                if failed:
                    raise failed[0] if isinstance(failed[0], Exception) else InputError(str(failed[0]))
                result = self.finish(result, rows)
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(value.astype(self.output_dtypes[name], copy=False)))
                    for name, value in result.items()
                ]
                return pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:
                result = self.failure(exc, "finishing a request")
        return pb_utils.InferenceResponse(error=result.error())

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
                responses[index] = pb_utils.InferenceResponse(error=rows.error())
            seconds[index] = time.perf_counter() - began
        answered: set[int] = set()
        if prepared:
            counts = [len(next(iter(rows.values()))) for _, rows in prepared]
            if self.early_responses:
                starts = np.cumsum([0, *counts[:-1]])
                self._batch = [(requests[i], rows, int(a), c) for (i, rows), a, c in zip(prepared, starts, counts)]
                self._answered = set()
            began = time.perf_counter()
            try:
                results = self.run_requests([rows for _, rows in prepared])
            finally:
                answered = {prepared[position][0] for position in self._answered}
                self._batch, self._answered = None, set()
            batch_seconds = time.perf_counter() - began
            for (index, rows), count, result in zip(prepared, counts, results):
                seconds[index] += batch_seconds * count / sum(counts)
                if index not in answered:
                    responses[index] = self.respond(result, rows)
        for request_seconds in seconds:
            self.metrics.preprocessed(request_seconds)
        self.metrics.resident()
        if not self.early_responses:
            return responses
        for request, response in zip(requests, responses):
            if response is not None:
                send_final(request, response)
        return None

    def finalize(self) -> None:
        self.metrics.close()
