"""Run a repository's preprocessing stages in this process, for debugging parity.

`preprocess(repository, ensemble, files)` follows the ensemble's steps from its input up to the
first encoder and computes what the served preprocessing models compute, from the same files
and parameters (`model.dali`, recipes), without a server. The result is the encoder's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonkit.errors import InputError, TritonkitError
from tritonkit.repository import TEMPLATE_PARAMETER, VERSION, read_repository
from tritonkit.triton_config import parameter


def _dali(model_dir: Path, config, rows: dict[str, list]) -> dict[str, np.ndarray]:
    from tritonkit.preprocessing.dali import DaliRunner, RowFailed

    if config.backend == "dali":
        raise TritonkitError(
            f"{config.name} is a DALI-backend model with GPU operators; it cannot run without a GPU",
            hint="rebuild with --target cpu to debug the same pipeline with CPU operators",
        )
    runner = DaliRunner((model_dir / VERSION / "model.dali").read_bytes(), max(len(next(iter(rows.values()))), 1))
    results = []
    for result in runner.run(rows):
        if isinstance(result, RowFailed):
            raise InputError(f"{config.input[0].name}: not decodable ({result})")
        results.append(result)
    return {o.name: np.stack([r[i] for r in results]) for i, o in enumerate(config.output)}


def _json_parameter(config, key: str) -> str:
    value = parameter(config, key)
    if value is None:
        raise InputError(f"{config.name}: its config has no {key!r} parameter; rebuild the repository")
    return value


def _run_step(model_dir: Path, config, tensors: dict) -> dict[str, Any]:
    from tritonkit.preprocessing.audio import (
        AudioRecipe,
        content_frames,
        decode_audio,
        log_mel,
        pad_window,
        split_windows,
    )
    from tritonkit.preprocessing.image import ImageRecipe, checked_image_bytes, image_bytes_to_pixels

    template = parameter(config, TEMPLATE_PARAMETER)
    inputs = [i.name for i in config.input]
    outputs = [o.name for o in config.output]
    if template == "image_check":
        checks = ImageRecipe.from_json(_json_parameter(config, "image_recipe"))
        return {outputs[0]: [checked_image_bytes(data, checks) for data in tensors[inputs[0]]]}
    if template == "image_preprocess":
        image = ImageRecipe.from_json(_json_parameter(config, "recipe"))
        return {outputs[0]: np.stack([image_bytes_to_pixels(data, image) for data in tensors[inputs[0]]])}
    if template == "dali_pipeline" or config.backend == "dali":
        rows = {}
        recipe_json = parameter(config, "image_recipe")
        for name in inputs:
            values = tensors[name]
            if recipe_json and name == inputs[0]:
                values = [checked_image_bytes(data, ImageRecipe.from_json(recipe_json)) for data in values]
            rows[name] = [np.frombuffer(v, dtype=np.uint8) if isinstance(v, bytes) else np.asarray(v) for v in values]
        return _dali(model_dir, config, rows)
    if template == "audio_preprocess":
        recipe = AudioRecipe.from_json(_json_parameter(config, "recipe"))
        windows = [w for data in tensors[inputs[0]] for w in split_windows(decode_audio(data, recipe), recipe)]
        if outputs[0] == "INPUT_FEATURES":
            mel_filters = np.load(model_dir / VERSION / "mel_filters.npy")
            return {outputs[0]: log_mel(windows, mel_filters, recipe.padding)}
        prepared = {outputs[0]: np.stack([pad_window(w) for w in windows])}
        if "WINDOW_FRAMES" in outputs:
            prepared["WINDOW_FRAMES"] = np.array([[content_frames(w)] for w in windows], dtype=np.int32)
        return prepared
    return {}


def preprocess(repository: Path, ensemble: str, files: Sequence[bytes]) -> dict[str, np.ndarray]:
    """The tensors the ensemble's first encoder receives for `files` (one file per row)."""
    repository = Path(repository)
    configs = read_repository(repository)
    if ensemble not in configs or configs[ensemble].platform != "ensemble":
        ensembles = sorted(n for n, c in configs.items() if c.platform == "ensemble")
        raise InputError(
            f"{ensemble!r} is not an ensemble of {repository}", hint=f"choose one of: {', '.join(ensembles)}"
        )
    tensors: dict = {configs[ensemble].input[0].name: list(files)}
    for index, step in enumerate(configs[ensemble].ensemble_scheduling.step):
        config = configs[step.model_name]
        is_preprocessing = (
            parameter(config, TEMPLATE_PARAMETER)
            in ("image_check", "image_preprocess", "dali_pipeline", "audio_preprocess")
            or config.backend == "dali"
        )
        if not is_preprocessing and index == 0:
            raise InputError(
                f"{step.model_name}: not a preprocessing model tritonkit knows",
                hint="rebuild the repository with this version of tritonkit",
            )
        if not is_preprocessing:
            return {name: np.asarray(tensors[tensor]) for name, tensor in step.input_map.items() if tensor in tensors}
        step_inputs = {name: tensors[tensor] for name, tensor in step.input_map.items() if tensor in tensors}
        produced = _run_step(repository / step.model_name, config, step_inputs)
        tensors.update({step.output_map[name]: value for name, value in produced.items() if name in step.output_map})
    raise InputError(f"{ensemble}: no encoder step found")
