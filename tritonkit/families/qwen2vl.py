"""Qwen2-VL and Qwen2.5-VL: image chat with images at their own resolution, through LLaVA's contract.

The checkpoint's image processor turns each image into its own grid of patches (within its pixel
budget); the vision tower with its patch merger is one graph over a ragged batch of images (block
attention masks from per-patch image and window ids, `tritonkit.qwen_vl`); the language model
decodes in the Python backend with LLaVA's ChatGenerator, each image's placeholder expanded to its
own number of visual tokens and positions given as transformers' M-RoPE (`get_rope_index`).
Qwen2.5-VL differs only in its tower (RMSNorm, gated MLP, window attention), which the graph reads
from the config: its variant names its model class and makes its own tiny model.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tritonkit.contracts import CHAT, IMAGE, IMAGES, MAX_NEW_TOKENS, MESSAGES, PROMPT, SEED, STOP, TEMPERATURE, TOP_P
from tritonkit.errors import InputError, TritonkitError
from tritonkit.families.base import (
    PLAN_DIMS_PARAMETER,
    ROWS_PER_RUN_PARAMETER,
    SERVER_MEMORY_ROLE,
    BuildOptions,
    FamilySpec,
    OnnxExport,
    Pipeline,
    Stage,
    StageMemory,
    Tolerance,
    dali_artefact,
    engine_parameters,
    flag,
    register,
    saved_pretrained,
)
from tritonkit.families.llava import (
    FEATURE_CACHE_ENTRIES,
    IMAGE_FEATURES,
    ChatBuildOptions,
    chat_decoders,
    chat_pipelines,
)
from tritonkit.qwen_vl import VisionLayout, image_tokens, pixel_budget, vision_inputs
from tritonkit.triton_config import Batching, Tensor

# The chat contract's IMAGES: several images in one request (BYTES, one encoded image each).
MAX_IMAGES = 4
# Between composing models.
PATCHES = "PATCHES"
GRID_THW = "GRID_THW"
# The vision graph's index inputs (tritonkit.qwen_vl.vision_inputs).
POSITIONS, SEGMENTS, WINDOW_INDEX, WINDOW_SEGMENTS = "POSITIONS", "SEGMENTS", "WINDOW_INDEX", "WINDOW_SEGMENTS"
# A vision run's patches: images share a run's dense attention under a block mask, whose wasted
# work grows with the run's square; up to about 6x the tower's width it stays below the cost of the
# blocks' linear layers (2N²d for scores and values against 12Nd² a block), past it images run apart.
RUN_PATCHES_PER_WIDTH = 6
MIN_PATCHES_PER_RUN, MAX_PATCHES_PER_RUN = 256, 8192
# What one vision run's attention scores (float32, every head: 4 x heads x patches²) may take. A run
# holds one image at least, so an image may have no more patches than fit: checkpoints that allow
# more (Qwen2-VL-7B's 12.8 MP: 65,536 patches, 275 GB of scores) get their max_pixels lowered.
ATTENTION_BUDGET_BYTES = 2 * 2**30
# Sample images' patch grids for export and validation: four sizes in one batch, then fewer.
SAMPLE_GRIDS = ([[1, 8, 8], [1, 4, 6], [1, 6, 4], [1, 14, 14]], [[1, 4, 4]], [[1, 10, 6], [1, 4, 8]])


# The DALI preprocessing stub's fixed memory (no transformers or torch: DALI and PIL), measured as
# the family's `memory` (scripts/bench_qwen2vl.py, `tritonkit plan --measure` after its runs).
DALI_PREPROCESS_MEMORY = StageMemory(fixed_mb=190)


@dataclass(frozen=True)
class QwenVLBuildOptions(ChatBuildOptions):
    """Qwen-VL's build options: a chat family's, and the visual tokens per image."""

    max_image_tokens: int | None = flag(
        "Visual tokens per image (its max_pixels / 28²); larger images are resized down as the "
        "processor does. Default: the checkpoint's, lowered to what one vision run's attention holds in 2 GiB."
    )

    def __post_init__(self):
        super().__post_init__()
        if self.max_image_tokens is not None and self.max_image_tokens < 1:
            raise InputError(f"--max-image-tokens must be >= 1, got {self.max_image_tokens}")


@dataclass
class LoadedQwenVL:
    model: Any  # Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration
    tokenizer: Any  # with the chat template
    image_processor: Any  # Qwen2VLImageProcessor(Pil)

    @property
    def layout(self) -> VisionLayout:
        return VisionLayout.from_config(self.model.config.vision_config)

    @property
    def text_hidden(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def attention_patches(self) -> int:
        """The most patches one vision run may hold within ATTENTION_BUDGET_BYTES (whole merge units)."""
        heads = int(self.model.config.vision_config.num_heads)
        unit = self.layout.merge_size**2
        return math.isqrt(ATTENTION_BUDGET_BYTES // (4 * heads)) // unit * unit

    @property
    def patches_per_run(self) -> int:
        vision = self.model.config.vision_config
        width = int(getattr(vision, "embed_dim", None) or vision.hidden_size)  # Qwen2-VL names it embed_dim
        wanted = max(MIN_PATCHES_PER_RUN, min(MAX_PATCHES_PER_RUN, RUN_PATCHES_PER_WIDTH * width))
        return min(wanted, self.attention_patches)

    @property
    def largest_run(self) -> int:
        """The most patches one vision run holds: its patch budget, or one image at the processor's
        max_pixels (whole merge units)."""
        unit = self.layout.merge_size**2
        largest_image = pixel_budget(self.image_processor)[1] // self.layout.patch_size**2
        return max(self.patches_per_run, largest_image // unit * unit)

    @property
    def pixels_per_token(self) -> int:
        return (self.layout.patch_size * self.layout.merge_size) ** 2

    def bound_image_tokens(self, tokens: int | None) -> str | None:
        """Lower the image processor's max_pixels to `tokens` visual tokens per image (None: to what a
        vision run holds, if the checkpoint allows more); returns what changed, or None."""
        low, high = pixel_budget(self.image_processor)
        fits = self.attention_patches // self.layout.merge_size**2
        if tokens is not None and not (low <= tokens * self.pixels_per_token and tokens <= fits):
            raise InputError(
                f"--max-image-tokens {tokens}: use {-(-low // self.pixels_per_token)} to {fits} (the processor's "
                f"min_pixels {low}; one vision run's attention within {ATTENTION_BUDGET_BYTES >> 20} MiB)"
            )
        bound = (tokens if tokens is not None else fits) * self.pixels_per_token
        if bound < low:
            raise InputError(
                f"the image processor's min_pixels {low} is more than one vision run's attention holds within "
                f"{ATTENTION_BUDGET_BYTES >> 20} MiB ({fits} visual tokens)",
                hint="lower min_pixels in the checkpoint's preprocessor_config.json",
            )
        if bound == high or (bound > high and tokens is None):
            return None
        config = self.image_processor.to_dict()
        for key in ("min_pixels", "max_pixels", "image_processor_type"):
            config.pop(key, None)
        config["size"] = {"shortest_edge": low, "longest_edge": bound}
        self.image_processor = type(self.image_processor).from_dict(config)
        why = (
            "--max-image-tokens"
            if tokens is not None
            else f"a vision run's attention within {ATTENTION_BUDGET_BYTES >> 20} MiB"
        )
        return f"image processor: max_pixels {high} -> {bound} ({bound // self.pixels_per_token} visual tokens an image; {why})"

    @property
    def patch_values(self) -> int:
        """Values per patch: channels x temporal patch x patch x patch."""
        vision = self.model.config.vision_config
        return int(vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)


def image_limits(formats):
    """The ImageRecipe that checks every image from its header (bytes, pixels, formats); its resize
    fields are unused: the size is the processor's own (`PatchRecipe`)."""
    from tritonkit.preprocessing.image import ImageRecipe

    return ImageRecipe(None, 28, 28, None, None, 3, None, None, None, resize_mode="fit", formats=tuple(formats))


def image_inputs(loaded: LoadedQwenVL, images) -> tuple[np.ndarray, np.ndarray]:
    """PIL images -> (pixel_values [patches, D], image_grid_thw [images, 3]) by the checkpoint's processor."""
    processed = loaded.image_processor(images=images, return_tensors="np")
    return np.asarray(processed["pixel_values"], np.float32), np.asarray(processed["image_grid_thw"], np.int64)


def tensorrt_options(loaded: LoadedQwenVL, precision: str) -> dict[str, Any]:
    """ONNX Runtime's TensorRT provider options for the vision graph: one optimisation profile from
    one merge unit to the most patches a run holds (`largest_run`, finite because
    `bound_image_tokens` bounds every image), so TensorRT builds its engine once instead of once per
    new run size; FP16 kernels for --precision fp16; engines cached across restarts."""
    unit = loaded.layout.merge_size**2

    def shapes(patches: int) -> str:
        dims = {PATCHES: f"{patches}x{loaded.patch_values}", POSITIONS: f"{patches}x2", SEGMENTS: f"{patches}"}
        if loaded.layout.windowed:
            dims |= {WINDOW_INDEX: f"{patches // unit}", WINDOW_SEGMENTS: f"{patches}"}
        return ",".join(f"{name}:{dims[name]}" for name in dims)

    return {
        "trt_profile_min_shapes": shapes(unit),
        "trt_profile_opt_shapes": shapes(loaded.patches_per_run),
        "trt_profile_max_shapes": shapes(loaded.largest_run),
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
    }


@register
class Qwen2VLSpec(FamilySpec):
    name = "qwen2vl"
    contract = CHAT
    options_class = QwenVLBuildOptions
    model_types = ("qwen2_vl",)
    description = (
        "Qwen2-VL / Qwen2.5-VL image chat at each image's own resolution -> ensembles NAME_chat and "
        "NAME_chat_stream (IMAGE or IMAGES (1-4) + PROMPT or MESSAGES in, TEXT out), NAME_chat_text and "
        "NAME_chat_text_stream (no image)"
    )
    model_class = "Qwen2VLForConditionalGeneration"
    processor_classes: ClassVar[Mapping[str, str]] = {
        "tokenizer": "AutoTokenizer",
        "image_processor": "AutoImageProcessor",
    }
    loaded_class = LoadedQwenVL
    tolerances: ClassVar[Mapping[str, Tolerance]] = {"vision_encoder": Tolerance(max_abs=1e-4, min_cosine=0.9999)}
    batching: ClassVar[Mapping[str, Batching]] = {
        "image_preprocess": Batching(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=2000),
        "vision_encoder": Batching(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=2000),
        "decoder": Batching(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=5000),
        "decoder_stream": Batching(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=5000),
    }

    # Fixed resident memory per stage beyond weights and buffers, measured with the scaled-down
    # model of scripts/bench_qwen2vl.py (`tritonkit plan REPO --measure` after its served runs):
    # the preprocessing stub holds transformers, torch and the image processor; the vision stub
    # torch and transformers' vision_utils beside ONNX Runtime.
    memory: ClassVar[Mapping[str, StageMemory]] = {
        "image_preprocess": StageMemory(fixed_mb=300),  # --preprocessing python (DALI's below)
        "vision_encoder": StageMemory(fixed_mb=260),
        # LLaVA's decoder stubs' figures (the same chat_decoder stage and libraries): not measured
        # on Qwen-VL's own soak yet
        "decoder": StageMemory(fixed_mb=362),
        "decoder_stream": StageMemory(fixed_mb=334),
        SERVER_MEMORY_ROLE: StageMemory(fixed_mb=45),
    }

    def fit(self, loaded: LoadedQwenVL, options: BuildOptions) -> list[str]:
        change = loaded.bound_image_tokens(self.family_options(options).max_image_tokens)
        return [change] if change else []

    def memory_for(self, options: BuildOptions) -> Mapping[str, StageMemory]:
        shared = super().memory_for(options)
        if options.preprocessing != "dali":
            return shared
        return {**shared, "image_preprocess": DALI_PREPROCESS_MEMORY}

    @staticmethod
    def make_tiny(directory: Path) -> Path:
        """A small random Qwen2-VL with GPT-2's BPE plus Qwen's special tokens and chat template."""
        return make_tiny_qwen_vl(directory, variant="qwen2_vl")

    def tensors(self, loaded: LoadedQwenVL) -> dict[str, Tensor]:
        return {
            **CHAT.tensors(optional=(IMAGE,)),  # IMAGE or IMAGES
            PATCHES: Tensor(PATCHES, "float32", (-1, loaded.patch_values), ragged=True),
            GRID_THW: Tensor(GRID_THW, "int64", (-1, 3), ragged=True),
            IMAGE_FEATURES: Tensor(IMAGE_FEATURES, "float32", (-1, loaded.text_hidden), ragged=True),
        }

    def graph_tensors(self, loaded: LoadedQwenVL) -> tuple[tuple[Tensor, ...], Tensor]:
        """The vision graph's inputs (per patch, or per merge unit) and output (per visual token)."""
        inputs = [
            Tensor(PATCHES, "float32", (loaded.patch_values,)),
            Tensor(POSITIONS, "int64", (2,)),
            Tensor(SEGMENTS, "int64", ()),
        ]
        if loaded.layout.windowed:
            inputs += [Tensor(WINDOW_INDEX, "int64", ()), Tensor(WINDOW_SEGMENTS, "int64", ())]
        return tuple(inputs), Tensor(IMAGE_FEATURES, "float32", (loaded.text_hidden,))

    def exports(self, loaded: LoadedQwenVL) -> list[OnnxExport]:
        import torch

        from tritonkit.qwen_vl import vision_module

        inputs, output = self.graph_tensors(loaded)
        generator = torch.Generator().manual_seed(0)
        samples = []
        for grids in SAMPLE_GRIDS:
            grid = np.asarray(grids, dtype=np.int64)
            feed = {name: torch.from_numpy(value) for name, value in vision_inputs(grid, loaded.layout).items()}
            patches = int(np.prod(grid, axis=1).sum())
            feed[PATCHES] = torch.randn((patches, loaded.patch_values), generator=generator)
            samples.append(feed)
        per_unit = {WINDOW_INDEX: "units", IMAGE_FEATURES: "units"}
        return [
            OnnxExport(
                role="vision_encoder",
                module=vision_module(loaded.model.model.visual, loaded.layout),
                inputs=inputs,
                outputs=(output,),
                sample_inputs=samples,
                tolerance=self.tolerance("vision_encoder"),
                first_axis={t.name: per_unit.get(t.name, "patches") for t in (*inputs, output)},
            )
        ]

    def pipelines(
        self, loaded: LoadedQwenVL, onnx_files: Mapping[str, Path], options: BuildOptions = BuildOptions()
    ) -> list[Pipeline]:
        from tritonkit.engines import graph_files, graph_name

        if options.native_backends or options.engine == "tensorrt":
            raise InputError(
                f"{self.name}: the ragged vision graph runs in the Python backend (ONNX Runtime, its TensorRT "
                "provider, or OpenVINO)",
                hint="leave out --native-backends; on a GPU use --engine onnxruntime or onnxruntime-trt",
            )
        t = self.tensors(loaded)
        from tritonkit.qwen_vl import save_language_model

        language = saved_pretrained(
            "language model (PyTorch)", "language_model", lambda path: save_language_model(loaded.model, path)
        )
        tokenizer = saved_pretrained("tokenizer and chat template", "tokenizer", loaded.tokenizer.save_pretrained)
        preprocess = self.preprocess_stage(loaded, t, options)
        graph = onnx_files["vision_encoder"]
        # GPU: the same Python-backend stages, the vision graph on ONNX Runtime's CUDA provider (or
        # its TensorRT provider, --engine onnxruntime-trt) and the language model on CUDA
        gpu = {}
        if options.gpu:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if options.engine == "onnxruntime-trt":
                providers.insert(0, "TensorrtExecutionProvider")
                gpu["tensorrt_options"] = json.dumps(tensorrt_options(loaded, options.precision))
            gpu["providers"] = ",".join(providers)
        vision = Stage(
            "vision_encoder",
            "qwen_vl_vision",
            (t[PATCHES], t[GRID_THW]),
            (t[IMAGE_FEATURES],),
            self.stage_batching("vision_encoder"),
            {
                **engine_parameters(graph, "model", options),
                "vision_layout": json.dumps(asdict(loaded.layout)),
                "max_patches_per_run": str(loaded.patches_per_run),
                "feature_cache_entries": str(FEATURE_CACHE_ENTRIES),
                # the largest run (its patch budget, or one image at the processor's max_pixels): the
                # graph's attention masks and scores grow with its square
                PLAN_DIMS_PARAMETER: json.dumps(
                    {"patches": loaded.largest_run, "units": loaded.largest_run // loaded.layout.merge_size**2}
                ),
                **gpu,
            },
            graph_files(graph, "model"),
            kind="KIND_GPU" if options.gpu else "KIND_CPU",
            graphs={graph_name(graph, "model"): "vision_encoder"},
        )
        # GRID_THW: absent in a text-only turn (NAME_chat_text), as the image features are
        grids = replace(t[GRID_THW], optional=True)
        options_in = (t[MAX_NEW_TOKENS], t[TEMPERATURE], t[TOP_P], t[SEED], t[STOP], t[MESSAGES], grids)
        decoders = chat_decoders(
            self,
            loaded,
            t,
            options,
            options_in,
            (language, tokenizer),
            {"processor_dir": "tokenizer", "mrope_merge_size": str(loaded.layout.merge_size)},
        )
        inputs = (t[IMAGE], t[IMAGES], t[PROMPT], *options_in[:-1])  # GRID_THW is made inside
        return chat_pipelines(t, inputs, (preprocess, vision), decoders)

    def preprocess_stage(self, loaded: LoadedQwenVL, t: Mapping[str, Tensor], options: BuildOptions) -> Stage:
        """Images -> PATCHES, GRID_THW: DALI (the default; GPU operators in a GPU repository) or the
        checkpoint's image processor (`--preprocessing python`, equal to transformers)."""
        from tritonkit.preprocessing.dali import patches_graph
        from tritonkit.preprocessing.image import DALI_FORMATS, PIL_FORMATS
        from tritonkit.qwen_vl import RESIZED_SIZE, PatchRecipe

        dali = options.preprocessing == "dali"
        limits = image_limits(DALI_FORMATS if dali else PIL_FORMATS).with_options(**options.image.recipe_options())
        undecodable = sorted(set(limits.formats) - set(DALI_FORMATS))
        if dali and undecodable:
            raise InputError(
                f"DALI does not decode {', '.join(undecodable)} images",
                hint="leave them out of --image-formats, or use --preprocessing python (CPU only)",
            )
        batching = self.stage_batching("image_preprocess")
        parameters = {"max_images": str(MAX_IMAGES), "image_recipe": limits.to_json()}
        if not dali:
            processor = saved_pretrained("image processor", "image_processor", loaded.image_processor.save_pretrained)
            parameters["image_processor_dir"] = "image_processor"
            artefacts = (processor,)
        else:
            recipe = PatchRecipe.from_processor(loaded.image_processor, exif_orientation=limits.exif_orientation)
            images_per_run = batching.max_batch_size * MAX_IMAGES
            artefacts = (dali_artefact(patches_graph(recipe, "IMAGE", RESIZED_SIZE), images_per_run, options),)
            parameters |= {
                "patch_recipe": recipe.to_json(),
                "num_threads": str(options.dali_threads),
                ROWS_PER_RUN_PARAMETER: str(images_per_run),
            }
        return Stage(
            "image_preprocess",
            "qwen_vl_preprocess",
            # PROMPT and MESSAGES too, only so that a turn without images reaches the model (a request
            # with no input at all is refused by Triton in its own words) and is told what it lacks
            (t[IMAGE], t[IMAGES], t[PROMPT], t[MESSAGES]),
            (t[PATCHES], t[GRID_THW]),
            batching,
            parameters,
            artefacts=artefacts,
            kind="KIND_GPU" if options.gpu and dali else "KIND_CPU",
        )

    # -- reduced precision -----------------------------------------------------------------
    precision_thresholds: ClassVar[Mapping[str, Mapping[str, float]]] = {
        "fp16": {"min_cosine": 0.999},
        "bf16": {"min_cosine": 0.995},
        "int8": {"min_cosine": 0.99},
    }

    def precision_data(self, loaded: LoadedQwenVL, exports, onnx_files, calibration_dir):
        """Images (*.jpg, *.png, ...) from `calibration_dir` (a quarter held out), or the built-in
        varied images (`tritonkit.calibration`; one of each kind held out), each at its own
        resolution as the processor sizes it, four images a run."""
        from tritonkit.calibration import calibration_images
        from tritonkit.precision import PrecisionData, split_files
        from tritonkit.preprocessing.image import to_rgb

        images, source, heldout_share = calibration_images(calibration_dir)

        def feeds(files: list[bytes]) -> list[dict[str, np.ndarray]]:
            from PIL import Image

            runs = []
            for start in range(0, len(files), 4):
                pictures = [to_rgb(Image.open(io.BytesIO(f))) for f in files[start : start + 4]]
                pixels, grids = image_inputs(loaded, pictures)
                runs.append({PATCHES: pixels, **vision_inputs(grids, loaded.layout)})
            return runs

        calibration, heldout = split_files(images, heldout_share)
        return PrecisionData(
            calibration={"vision_encoder": feeds(calibration)},
            heldout={"vision_encoder": feeds(heldout)},
            source=source,
            builtin=calibration_dir is None,
        )

    # -- reference (tests, benchmarks) -------------------------------------------------------
    def prompt_ids(self, loaded: LoadedQwenVL, messages: list[dict], grids: np.ndarray | list) -> list[int]:
        """The chat-templated conversation's token ids with each image's placeholder expanded to its
        visual tokens, as Qwen2VLProcessor makes them."""
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pad = "<|image_pad|>"
        pieces = text.split(pad)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(grids)} images")
        counts = [image_tokens(g, loaded.layout.merge_size) for g in grids]
        expanded = pieces[0] + "".join(pad * n + piece for n, piece in zip(counts, pieces[1:]))
        return loaded.tokenizer(expanded)["input_ids"]

    def reference_tokens(
        self, loaded: LoadedQwenVL, images, messages: list[dict], max_new_tokens: int, processed=None
    ) -> list[int]:
        """transformers `generate` (greedy) on these PIL images (through the checkpoint's processor)
        or on `processed` = (pixel_values, image_grid_thw), and this conversation."""
        import torch

        if processed is not None:
            pixels, grids = processed
        else:
            pixels, grids = image_inputs(loaded, images) if images else (None, None)
        ids = torch.tensor([self.prompt_ids(loaded, messages, grids if grids is not None else [])])
        kwargs: dict[str, Any] = {}
        if pixels is not None:
            kwargs = {
                "pixel_values": torch.from_numpy(pixels),
                "image_grid_thw": torch.from_numpy(grids),
                "mm_token_type_ids": (ids == loaded.model.config.image_token_id).int(),
            }
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                **kwargs,
            )
        return out[0, ids.shape[1] :].tolist()


@register
class Qwen25VLSpec(Qwen2VLSpec):
    """Qwen2.5-VL: its model class and tiny model; its tower's window attention comes from the config."""

    name = "qwen2_5vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"

    @staticmethod
    def make_tiny(directory: Path) -> Path:
        """A small random Qwen2.5-VL (window attention in all but the last vision block)."""
        return make_tiny_qwen_vl(directory, variant="qwen2_5_vl")


# -- the tiny model (tests, the demo): random weights, a real architecture and tokenizer --------
# Qwen2-VL-Instruct's chat template (images as <|vision_start|><|image_pad|><|vision_end|>).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


QWEN_VL_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def make_tiny_qwen_vl(
    directory: Path,
    *,
    variant: str = "qwen2_vl",
    text_hidden: int = 64,
    vision_hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vision_layers: int | None = None,
    max_image_tokens: int = 64,
    init_std: float = 0.2,
    seed: int = 0,
) -> Path:
    """A random Qwen2-VL (`variant` qwen2_vl) or Qwen2.5-VL (qwen2_5_vl): the real vision tower
    (Qwen2.5-VL's with window attention in all but its last block) and language model with M-RoPE,
    GPT-2's BPE (from the bundled Whisper tiny.en) with Qwen's special tokens and chat template, and
    the Qwen2-VL image processor with a small pixel budget (4 to `max_image_tokens` visual tokens
    per image). The sizes are arguments so that benchmarks can make a larger one.

    The tokenizer and image processor are saved on their own: transformers' Qwen2-VL processor
    needs its video processor, which needs torchvision (not installable beside this torch)."""
    import json

    import torch
    import transformers
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tritonkit.tiny import gpt2_bpe

    if variant not in ("qwen2_vl", "qwen2_5_vl"):
        raise TritonkitError(f"Qwen-VL variant {variant!r}: use qwen2_vl or qwen2_5_vl")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = gpt2_bpe()
    bpe.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])  # Qwen adds no BOS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_VL_SPECIALS)})
    tokenizer.padding_side = "left"
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE

    def token(text: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(text)
        assert isinstance(token_id, int)
        return token_id

    torch.manual_seed(seed)
    head_dim = text_hidden // heads
    text: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden,
        "intermediate_size": 4 * text_hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        # M-RoPE: the rotary half-dims split over (temporal, height, width) as Qwen's 2:3:3
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16],
            "rope_theta": 10000.0,
        },
        "initializer_range": init_std,
        "eos_token_id": token("<|im_end|>"),
        "pad_token_id": token("<|endoftext|>"),
        "bos_token_id": token("<|endoftext|>"),
    }
    common: dict[str, Any] = {
        "depth": layers,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config_class: Any
    model_class: Any
    if variant == "qwen2_vl":
        vision = {**common, "embed_dim": vision_hidden, "hidden_size": text_hidden, "mlp_ratio": 2}
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision = {
            **common,
            "hidden_size": vision_hidden,
            "out_hidden_size": text_hidden,
            "intermediate_size": 2 * vision_hidden,
            "window_size": 56,  # 2x2 merged patches per window
            "fullatt_block_indexes": [(vision_layers or layers) - 1],
        }
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    vision["initializer_range"] = init_std
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    model = model_class(config).eval()
    model.generation_config.eos_token_id = token("<|im_end|>")
    model.generation_config.pad_token_id = token("<|endoftext|>")
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * max_image_tokens).save_pretrained(
        str(directory)
    )
    (directory / "tritonkit_tiny.json").write_text(
        json.dumps({"made_by": f"tritonkit.families.qwen2vl.make_tiny_qwen_vl({variant})"})
    )
    return directory
