"""DALI preprocessing: one graph definition per stage, built with CPU or GPU operators.

The same function builds the graph that the DALI backend runs on a GPU (`model.dali` of a
`--target gpu` repository, mixed JPEG decode, GPU resize and spectrogram) and the graph that the
CPU repository runs inside a Python-backend model, so the pipeline that ships is the pipeline
that is tested. Pipelines are serialized with `device_id=None`, which needs no GPU; the DALI
backend sets the device when it loads the file.

- Image: decode (EXIF orientation applied by default), resize with the processor's filter and
  transformers' integer sizes, center crop at transformers' offsets (or stretch, or letterbox),
  normalize, CHW float32.
- Log-mel: 16 kHz samples of one window -> Whisper features (pad/trim to 30 s, periodic Hann STFT
  n_fft 400 hop 160, Slaney mel bank, log10 clamped at max - 8, (x + 4) / 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tritonkit.errors import TritonkitError
from tritonkit.preprocessing.audio import FRAMES, HOP, N_FFT, SAMPLE_RATE, WINDOW_SAMPLES, hann_window
from tritonkit.preprocessing.image import ImageRecipe

DEVICES = ("cpu", "gpu")
# PIL resampling filter -> DALI interpolation (PIL: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic).
_INTERPOLATION = {0: "INTERP_NN", 1: "INTERP_LANCZOS3", 2: "INTERP_LINEAR", 3: "INTERP_CUBIC"}

Graph = Callable[[str], Sequence]  # device -> output DataNodes, called inside a Pipeline


def _dali():
    try:
        from nvidia.dali import fn, math, types
    except ImportError:
        raise TritonkitError("DALI is not installed", hint="pip install 'nvidia-dali-cuda120>=2,<3'") from None
    return fn, math, types


def image_graph(recipe: ImageRecipe, input_name: str) -> Graph:
    """Encoded image bytes (external source `input_name`) -> float32 [3, H, W]."""

    def graph(device: str):
        fn, math, types = _dali()
        out_h, out_w = recipe.output_hw
        data = fn.external_source(name=input_name, dtype=types.UINT8, ndim=1, device="cpu")
        decoder_device = "mixed" if device == "gpu" else "cpu"
        images = fn.decoders.image(
            data,
            device=decoder_device,
            output_type=types.RGB,
            adjust_orientation=recipe.exif_orientation,
            **({"jpeg_fancy_upsampling": True} if device == "gpu" else {}),
        )
        shape = images.shape(dtype=types.INT64, device="cpu")
        height, width = shape[0], shape[1]
        interpolation = getattr(types, _INTERPOLATION.get(recipe.resample, "INTERP_CUBIC"))
        fill = list(recipe.mean_pixel())
        if recipe.resize_mode == "crop":
            edge = recipe.shortest_edge or min(out_h, out_w)
            short = math.min(height, width)
            new_h, new_w = (edge * height) // short, (edge * width) // short  # transformers floors
        elif recipe.resize_mode == "pad":
            taller = fn.cast(height * out_w >= width * out_h, dtype=types.INT64)
            new_h = taller * out_h + (1 - taller) * ((out_w * height) // width)
            new_w = taller * ((out_h * width) // height) + (1 - taller) * out_w
        else:  # fit: stretch to the output size
            new_h, new_w = height * 0 + out_h, width * 0 + out_w  # DataNodes, so the size can be stacked
        size = fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT)
        images = fn.resize(images, size=size, interp_type=interpolation, antialias=True)
        # Center placement; integer division truncates, as transformers' padding-then-crop does.
        start = fn.cast(fn.stack((new_h - out_h) // 2, (new_w - out_w) // 2), dtype=types.INT32)
        images = fn.slice(
            images, start=start, shape=[out_h, out_w], axes=[0, 1], out_of_bounds_policy="pad", fill_values=fill
        )
        mean, std = recipe.pixel_mean_std()
        return (
            fn.crop_mirror_normalize(images, mean=list(mean), std=list(std), dtype=types.FLOAT, output_layout="CHW"),
        )

    return graph


def patches_graph(recipe, image_name: str, size_name: str) -> Graph:
    """Qwen-VL: encoded image bytes (`image_name`) and their resized size (`size_name`, int64 [2]
    = height, width from `PatchRecipe.resized`) -> the image's patches [h*w, 3 * t * p * p], laid out
    as Qwen2-VL's processor lays them (merge blocks first; each frame repeated `temporal_patch_size`
    times). The size is computed outside the graph because transformers rounds half to even."""

    def graph(device: str):
        fn, _, types = _dali()
        data = fn.external_source(name=image_name, dtype=types.UINT8, ndim=1, device="cpu")
        size = fn.external_source(name=size_name, dtype=types.INT64, ndim=1, device="cpu")
        images = fn.decoders.image(
            data,
            device="mixed" if device == "gpu" else "cpu",
            output_type=types.RGB,
            adjust_orientation=recipe.exif_orientation,
        )
        interpolation = getattr(types, _INTERPOLATION.get(recipe.resample, "INTERP_CUBIC"))
        images = fn.resize(images, size=fn.cast(size, dtype=types.FLOAT), interp_type=interpolation, antialias=True)
        scale = 1.0 / recipe.rescale_factor
        images = fn.crop_mirror_normalize(
            images,
            mean=[m * scale for m in recipe.mean],
            std=[s * scale for s in recipe.std],
            dtype=types.FLOAT,
            output_layout="CHW",
        )
        patch, merge, frames = recipe.patch_size, recipe.merge_size, recipe.temporal_patch_size
        rows, cols = size[0] // patch, size[1] // patch
        one = rows * 0 + 1  # constants as DataNodes, so they stack with the per-image sizes

        def shape(*dims):
            return fn.cast(fn.stack(*dims), dtype=types.INT32)

        # [C, H, W] -> [C, H/pm, m, p, W/pm, m, p] -> [H/pm, W/pm, m, m, C, p, p] -> frames -> [h*w, C*t*p*p]
        blocks = fn.reshape(
            images,
            shape=shape(one * 3, rows // merge, one * merge, one * patch, cols // merge, one * merge, one * patch),
            layout="",
        )
        blocks = fn.transpose(blocks, perm=[1, 4, 2, 5, 0, 3, 6])
        blocks = fn.stack(*([blocks] * frames), axis=5)
        return (fn.reshape(blocks, shape=shape(rows * cols, one * recipe.patch_values)),)

    return graph


def log_mel_graph(n_mels: int, input_name: str, padding: str = "audio", frames_input: str | None = None) -> Graph:
    """Samples of one window (float32 [-1], 16 kHz, <= 30 s) -> Whisper features [n_mels, 3000].

    padding="features" (faster-whisper's, `tritonkit.preprocessing.audio.log_mel`): `frames_input`
    (int32 [1]) gives each window's content frames; the log-mel is normalised over them and the
    next frame, and the other frames are 0."""

    def graph(device: str):
        fn, math, types = _dali()
        samples = fn.external_source(name=input_name, dtype=types.FLOAT, ndim=1, device="cpu")
        length = WINDOW_SAMPLES + (HOP if padding == "features" else 0)  # faster-whisper pads one hop
        if device == "gpu":
            samples = samples.gpu()
        samples = fn.pad(samples, axes=[0], shape=[length], fill_value=0.0)
        samples = fn.slice(samples, 0, length, axes=[0], out_of_bounds_policy="trim_to_shape")
        power = fn.spectrogram(
            samples,
            nfft=N_FFT,
            window_length=N_FFT,
            window_step=HOP,
            window_fn=hann_window().tolist(),
            center_windows=True,
            reflect_padding=True,
            power=2,
            layout="ft",
        )
        mel = fn.mel_filter_bank(
            power,
            sample_rate=SAMPLE_RATE,
            nfilter=n_mels,
            freq_low=0.0,
            freq_high=SAMPLE_RATE / 2,
            mel_formula="slaney",
            normalize=True,
        )
        mel = fn.slice(mel, 0, FRAMES, axes=[1])  # the STFT's last frame is dropped, as Whisper does
        log_spec = fn.to_decibels(mel, multiplier=1.0, reference=1.0, cutoff_db=-10.0)  # log10(max(x, 1e-10))
        if padding != "features":
            log_spec = math.max(log_spec, fn.reductions.max(log_spec) - 8.0)
            return ((log_spec + 4.0) / 4.0,)
        frames = fn.external_source(name=frames_input, dtype=types.INT32, ndim=1, device="cpu")
        if device == "gpu":
            frames = frames.gpu()
        index = types.Constant(np.arange(FRAMES, dtype=np.int32))
        content = fn.cast(index < frames, dtype=types.FLOAT)
        normalised_over = fn.cast(index <= frames, dtype=types.FLOAT)  # one frame more, as faster-whisper
        peak = fn.reductions.max(log_spec + (normalised_over - 1.0) * 100.0)  # log10 values are >= -10
        return ((math.max(log_spec, peak - 8.0) + 4.0) / 4.0 * content,)

    return graph


def serialize(graph: Graph, device: str, max_batch_size: int, num_threads: int = 1) -> bytes:
    """The `model.dali` bytes of `graph` with `device`'s operators."""
    from nvidia.dali.pipeline import Pipeline

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    pipe = Pipeline(batch_size=max_batch_size, num_threads=num_threads, device_id=None)
    with pipe:
        pipe.set_outputs(*graph(device))
    return pipe.serialize()


class RowFailed(Exception):
    """One row that DALI could not process (its batch mates were rerun without it)."""


def _reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("encountered"):
            detail = [x for x in lines[i + 1 :] if "no longer valid" not in x]
            return detail[0].rstrip(": ") if detail else "failed"
    return lines[-1] if lines else type(exc).__name__


class DaliRunner:
    """Runs a serialized CPU pipeline on batches of rows, isolating rows that fail.

    A DALI error invalidates the whole pipeline and fails every sample of the batch, so after an
    error the pipeline is rebuilt (a few ms) and the rows are run one by one: only the bad rows
    fail.
    """

    def __init__(self, serialized: bytes, max_batch_size: int, num_threads: int = 1, device_id: int | None = None):
        self.serialized = serialized
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.device_id = device_id  # a GPU for a pipeline serialized with GPU operators; None: CPU only
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            from nvidia.dali.pipeline import Pipeline

            pipe = Pipeline.deserialize(
                serialized_pipeline=self.serialized,
                batch_size=self.max_batch_size,
                num_threads=self.num_threads,
                device_id=self.device_id,
                exec_async=False,
                exec_pipelined=False,
                prefetch_queue_depth=1,
            )
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def _run(self, inputs: dict[str, list[np.ndarray]]) -> list[tuple[np.ndarray, ...]]:
        pipe = self._pipeline()
        try:
            for name, rows in inputs.items():
                pipe.feed_input(name, rows)
            outputs = pipe.run()
        except Exception:
            self._pipe = None
            raise
        count = len(next(iter(inputs.values())))
        outputs = [out.as_cpu() if hasattr(out, "as_cpu") else out for out in outputs]  # GPU operators' outputs
        return [tuple(np.array(out[i]) for out in outputs) for i in range(count)]

    def run_all(self, inputs: dict[str, list[np.ndarray]]) -> list[tuple[np.ndarray, ...]]:
        """Each row's outputs, raising the first row's failure (for callers whose inputs are known good)."""
        results = []
        for result in self.run(inputs):
            if isinstance(result, RowFailed):
                raise result
            results.append(result)
        return results

    def run(self, inputs: dict[str, list[np.ndarray]]) -> list[tuple[np.ndarray, ...] | RowFailed]:
        """Each row's outputs, or RowFailed for the rows DALI rejects."""
        count = len(next(iter(inputs.values())))
        results: list = []
        for start in range(0, count, self.max_batch_size):
            chunk = {name: rows[start : start + self.max_batch_size] for name, rows in inputs.items()}
            try:
                results += self._run(chunk)
            except Exception as exc:
                if len(next(iter(chunk.values()))) == 1:
                    results.append(RowFailed(_reason(exc)))
                    continue
                for i in range(len(next(iter(chunk.values())))):
                    results += self.run({name: rows[i : i + 1] for name, rows in chunk.items()})
        return results


def image_pixels(recipe: ImageRecipe, files: Sequence[bytes]) -> np.ndarray:
    """What a CPU repository's DALI image stage computes for `files`, in this process: [N, 3, H, W]."""
    from tritonkit.errors import InputError
    from tritonkit.preprocessing.image import checked_image_bytes

    batch = max(len(files), 1)
    runner = DaliRunner(serialize(image_graph(recipe, "IMAGE"), "cpu", batch), batch)
    checked = [np.frombuffer(checked_image_bytes(data, recipe), dtype=np.uint8) for data in files]
    results = runner.run({"IMAGE": checked})
    rows = []
    for result in results:
        if isinstance(result, RowFailed):
            raise InputError(f"IMAGE: not decodable ({result})", reason="undecodable")
        rows.append(result[0])
    return np.stack(rows)


def image_patches(recipe, limits: ImageRecipe, files: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """What a CPU repository's DALI stage computes for one request's images: Qwen-VL's
    (pixel_values [patches, D], image_grid_thw [images, 3]), as its image processor returns them."""
    from tritonkit.errors import InputError
    from tritonkit.qwen_vl import RESIZED_SIZE

    batch = max(len(files), 1)
    runner = DaliRunner(serialize(patches_graph(recipe, "IMAGE", RESIZED_SIZE), "cpu", batch), batch)
    sizes, checked = zip(*(resized_image(recipe, limits, data) for data in files))
    results = runner.run({"IMAGE": list(checked), RESIZED_SIZE: list(sizes)})
    failed = [r for r in results if isinstance(r, RowFailed)]
    if failed:
        raise InputError(f"IMAGE: not decodable ({failed[0]})", reason="undecodable")
    patches = np.concatenate([r[0] for r in results if not isinstance(r, RowFailed)])
    return patches, np.asarray([recipe.grid(*size) for size in sizes], np.int64)


def resized_image(recipe, limits: ImageRecipe, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One encoded image, checked against `limits` from its header: (its resized height and width
    as int64 [2], the bytes to decode). Nothing is decoded unless it has transparency."""
    from tritonkit.preprocessing.image import checked_image_bytes, inspect_image, oriented_size

    height, width = oriented_size(inspect_image(data, limits), recipe.exif_orientation)
    size = np.asarray(recipe.resized(height, width), dtype=np.int64)
    return size, np.frombuffer(checked_image_bytes(data, limits), dtype=np.uint8)


def log_mel_features(n_mels: int, windows: Sequence[np.ndarray], padding: str = "audio") -> np.ndarray:
    """What a CPU repository's DALI log-mel stage computes for 16 kHz windows: [N, n_mels, 3000]."""
    from tritonkit.preprocessing.audio import content_frames

    batch = max(len(windows), 1)
    frames_input = "WINDOW_FRAMES" if padding == "features" else None
    runner = DaliRunner(serialize(log_mel_graph(n_mels, "WINDOW_SAMPLES", padding, frames_input), "cpu", batch), batch)
    rows = {"WINDOW_SAMPLES": [np.ascontiguousarray(w, dtype=np.float32) for w in windows]}
    if frames_input:
        rows[frames_input] = [np.array([content_frames(w)], dtype=np.int32) for w in windows]
    results = runner.run(rows)
    failed = [r for r in results if isinstance(r, RowFailed)]
    if failed:
        raise RuntimeError(f"DALI failed on a 16 kHz window: {failed[0]}")
    return np.stack([r[0] for r in results if not isinstance(r, RowFailed)])
