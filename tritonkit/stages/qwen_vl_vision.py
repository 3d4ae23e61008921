"""Qwen-VL's vision tower for a dynamic batch of requests, each with its own images of their own sizes.

Inputs: PATCHES [patches, D] and GRID_THW [images, 3] (one request's images, from
qwen_vl_preprocess). Output: IMAGE_FEATURES [visual tokens of all its images, text hidden]. The
images of every request in the batch are encoded together: in runs of at most
`max_patches_per_run` patches (attention is a block mask over a run, so a run's work and memory grow
with its patches squared; an image larger than that runs alone), with the graph's index inputs computed from the grids
(`tritonkit.qwen_vl.vision_inputs`). Parameters: `model_file`, `engine`, `inference_precision`,
`intra_op_threads` (as onnx_encoder), `providers` (ONNX Runtime's; a GPU repository's start with
CUDAExecutionProvider, or TensorrtExecutionProvider with `tensorrt_options`), `vision_layout` (JSON of VisionLayout),
`feature_cache_entries` (images seen before, keyed by their patches, are not encoded again).
"""

import hashlib
import json
from collections import OrderedDict

import numpy as np

from tritonkit.batched_model import BatchedModel, object_rows
from tritonkit.qwen_vl import VisionLayout, image_tokens, vision_inputs


class TritonPythonModel(BatchedModel):
    def setup(self):
        from tritonkit.engines import onnxruntime_providers

        graph = self.parameters.get("model_file", "model.onnx")
        providers = onnxruntime_providers(self.parameters, self.model_name)
        self.session = self.open_session(self.version_dir / graph, providers=providers)
        self.graph_inputs = [i.name for i in self.session.get_inputs()]
        self.layout = VisionLayout(**json.loads(self.parameters["vision_layout"]))
        self.max_patches = int(self.parameters.get("max_patches_per_run", "1536"))
        self.cache_entries = int(self.parameters.get("feature_cache_entries", "0"))
        self.cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.patches_input, self.grid_input = self.input_names
        (self.features_output,) = self.output_dtypes

    def prepare(self, inputs):
        patches, grids = inputs[self.patches_input], inputs[self.grid_input]
        if len(patches) != 1 or len(grids) != 1:
            raise ValueError(f"{self.model_name}: one request's images per request")
        return {"patches": object_rows([patches[0]]), "grids": object_rows([grids[0]])}

    def run(self, batch):
        images = []  # (request, patches, grid) of every image in the batch
        for request, (patches, grids) in enumerate(zip(batch["patches"], batch["grids"])):
            bounds = np.cumsum([0, *(int(np.prod(g)) for g in grids)])
            if bounds[-1] != len(patches):
                raise ValueError(f"{len(patches)} patches for grids {grids.tolist()}")
            images += [(request, patches[a:b], grid) for a, b, grid in zip(bounds[:-1], bounds[1:], grids)]
        keys = [_key(patches, grid) for _, patches, grid in images]
        features: dict[bytes, np.ndarray] = {key: self.cache[key] for key in keys if key in self.cache}
        hits = sum(1 for key in keys if key in features)
        todo = {key: (patches, grid) for key, (_, patches, grid) in zip(keys, images) if key not in features}
        features.update(self.encode(todo))
        if self.cache_entries:
            self.metrics.cache_lookups(hits=hits, misses=len(keys) - hits)
            for key in keys:
                self.cache[key] = features[key]
                self.cache.move_to_end(key)
            while len(self.cache) > self.cache_entries:
                self.cache.popitem(last=False)
        per_request = [[] for _ in batch["patches"]]
        for (request, _, _), key in zip(images, keys):
            per_request[request].append(features[key])
        return {"features": object_rows([np.concatenate(parts) for parts in per_request])}

    def encode(self, todo):
        """Features of each image, the images encoded in runs of at most max_patches patches."""
        done, run = {}, []
        for key, (patches, grid) in todo.items():
            if run and sum(len(p) for _, p, _ in run) + len(patches) > self.max_patches:
                done.update(self.encode_run(run))
                run = []
            run.append((key, patches, grid))
        if run:
            done.update(self.encode_run(run))
        return done

    def encode_run(self, run):
        grids = np.stack([grid for _, _, grid in run])
        feed = {"PATCHES": np.concatenate([patches for _, patches, _ in run]), **vision_inputs(grids, self.layout)}
        (merged,) = self.session.run([self.features_output], {name: feed[name] for name in self.graph_inputs})
        bounds = np.cumsum([0, *(image_tokens(grid, self.layout.merge_size) for grid in grids)])
        return {key: merged[a:b] for (key, _, _), a, b in zip(run, bounds[:-1], bounds[1:])}

    def finish(self, outputs, rows):
        return {self.features_output: outputs["features"][0][None]}


def _key(patches: np.ndarray, grid: np.ndarray) -> bytes:
    digest = hashlib.blake2b(np.ascontiguousarray(patches).tobytes(), digest_size=20)
    digest.update(np.asarray(grid, dtype=np.int64).tobytes())
    return digest.digest()
