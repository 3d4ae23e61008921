"""A graph run by ONNX Runtime or OpenVINO inside the Python backend (the CPU stand-in for TensorRT).

Triton tensor names are the graph's input/output names. Parameters: `model_file` (default
model.onnx; an OpenVINO IR is model.xml), `engine` (onnxruntime or openvino) and
`inference_precision` (fp32, bf16 or int8: OpenVINO's precision hint), `intra_op_threads` (0 = ONNX
Runtime's default; OpenVINO: the cores over the instance count), `feature_cache_entries` (0 = off:
rows seen before are answered from `tritonkit.row_cache` without running the graph), `rows_per_run`
(0 = the whole batch at once; otherwise the batch runs in slices of that many rows, which bounds
ONNX Runtime's arena by the slice instead of the largest batch ever seen).
"""

from tritonkit.batched_model import BatchedModel, run_in_slices
from tritonkit.row_cache import RowCache


class TritonPythonModel(BatchedModel):
    def setup(self):
        self.session = self.open_session(self.version_dir / self.parameters.get("model_file", "model.onnx"))
        self.session_inputs = [i.name for i in self.session.get_inputs()]
        self.session_outputs = [o.name for o in self.session.get_outputs() if o.name in self.output_dtypes]
        self.rows_per_run = int(self.parameters.get("rows_per_run", "0"))
        entries = int(self.parameters.get("feature_cache_entries", "0"))
        self.cache = RowCache(entries) if entries > 0 else None

    def compute(self, feed):
        outputs = run_in_slices(lambda part: self.session.run(self.session_outputs, part), feed, self.rows_per_run)
        return dict(zip(self.session_outputs, outputs))

    def run(self, batch):
        feed = {name: batch[name] for name in self.session_inputs}
        if self.cache is None:
            return self.compute(feed)
        outputs, hits = self.cache.run(feed, self.compute)
        self.metrics.cache_lookups(hits=hits, misses=len(next(iter(feed.values()))) - hits)
        return outputs
