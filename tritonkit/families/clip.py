"""CLIP: image tower and text tower, each served as an ensemble that ends in projected embeddings."""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tritonkit.calibration import BUILTIN_NOTE, calibration_images
from tritonkit.contracts import EMBEDDINGS, IMAGE, IMAGE_EMBEDS, TEXT, TEXT_EMBEDS
from tritonkit.errors import TritonkitError
from tritonkit.families.base import (
    SERVER_MEMORY_ROLE,
    BuildOptions,
    FamilySpec,
    ImageOptions,
    OnnxExport,
    Pipeline,
    Stage,
    StageMemory,
    Tolerance,
    encoder_stage,
    image_preprocess_stages,
    image_recipe_for,
    register,
    saved_pretrained,
)
from tritonkit.triton_config import Batching, Tensor

# Between composing models (the public tensors are the embeddings contract's).
PIXEL_VALUES = "PIXEL_VALUES"
CHECKED_IMAGE = "CHECKED_IMAGE"  # GPU repositories: IMAGE after the per-request checks
INPUT_IDS = "INPUT_IDS"
ATTENTION_MASK = "ATTENTION_MASK"

SAMPLE_TEXTS = ["a photo of a cat", "", "a diagram " * 60, "Ünïcødé text, numbers 1234 and #tags"]
# The default calibration captions (with synthetic images) when --calibration-data is not given.
CALIBRATION_CAPTIONS = [
    "a photo of a dog playing in the snow",
    "a red car parked on a city street",
    "two people hiking up a mountain",
    "a bowl of fruit on a wooden table",
    "an aerial view of a coastline",
    "a black and white portrait of a woman",
    "a diagram of a neural network",
    "a cat sleeping on a laptop keyboard",
    "a plate of pasta with tomato sauce",
    "a crowded train station at rush hour",
    "a sunset over the ocean",
    "a child reading a book",
    "the interior of a modern kitchen",
    "a close-up of a flower with a bee",
    "a bicycle leaning against a wall",
    "a screenshot of a spreadsheet",
    "a herd of cows in a green field",
    "a painting of a harbour at night",
    "a person typing on a phone",
    "a bridge across a river in autumn",
    "a birthday cake with candles",
    "a snowy forest road",
    "a street market with vegetables",
    "a close-up photo of a watch",
]
CALIBRATION_BATCH = 4


@dataclass
class LoadedClip:
    model: Any
    tokenizer: Any
    image_processor: Any

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def max_text_length(self) -> int:
        positions = int(self.model.config.text_config.max_position_embeddings)
        return min(int(self.tokenizer.model_max_length or positions), positions)


def projected(output) -> Any:
    """get_*_features return a tensor in transformers 4 and a pooled output object in 5."""
    return output if hasattr(output, "shape") else output.pooler_output


def _image_tower(model):
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return projected(self.model.get_image_features(pixel_values=pixel_values))

    return ImageTower().eval()


def _text_tower(model):
    """input_ids (and, where the family takes one, attention_mask) -> projected text features."""
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            masks = {} if attention_mask is None else {"attention_mask": attention_mask}
            return projected(self.model.get_text_features(input_ids=input_ids, **masks))

    return TextTower().eval()


# Text tensors -> the tokenizer's names for them.
TOKENIZER_OUTPUTS = {INPUT_IDS: "input_ids", ATTENTION_MASK: "attention_mask"}


@register
class ClipSpec(FamilySpec):
    name = "clip"
    contract = EMBEDDINGS
    options_class = ImageOptions
    model_types = ("clip",)
    description = "CLIP image and text towers -> ensembles NAME_image and NAME_text"
    model_class = "CLIPModel"
    processor_classes: ClassVar[Mapping[str, str]] = {
        "tokenizer": "AutoTokenizer",
        "image_processor": "AutoImageProcessor",
    }
    loaded_class = LoadedClip
    tolerances: ClassVar[Mapping[str, Tolerance]] = {
        "image_encoder": Tolerance(max_abs=1e-4, min_cosine=0.9999),
        "text_encoder": Tolerance(max_abs=1e-4, min_cosine=0.9999),
    }
    # What the text encoder takes, in order (the tokenizer stage makes the same tensors).
    text_inputs: ClassVar[tuple[str, ...]] = (INPUT_IDS, ATTENTION_MASK)
    batching: ClassVar[Mapping[str, Batching]] = {
        "image_preprocess": Batching(max_batch_size=16, preferred_batch_sizes=(8, 16), max_queue_delay_us=2000),
        "image_encoder": Batching(max_batch_size=16, preferred_batch_sizes=(4, 8, 16), max_queue_delay_us=2000),
        "text_tokenizer": Batching(max_batch_size=64, preferred_batch_sizes=(16, 32, 64), max_queue_delay_us=1000),
        "text_encoder": Batching(max_batch_size=64, preferred_batch_sizes=(16, 32, 64), max_queue_delay_us=1000),
    }
    # Fixed resident memory per stage, measured with the tiny CLIP under jemalloc (the default
    # allocator; `python scripts/memory_before_after.py --allocators glibc jemalloc --family clip`:
    # three 90 s soaks at concurrency 16, `tritonkit plan --measure` after each, every process charged
    # its share of the pages the server's processes map, as a pod's limit charges them;
    # docs/RELIABILITY.md; glibc's malloc holds the image preprocessing 60 MB larger): DALI's
    # decoding buffers, the tokenizer (transformers and torch), ONNX Runtime's sessions. DALI's
    # buffers are what they grew to under the load seen: the same soak measured the image
    # preprocessing at 223-235 MB one hour and 178-180 MB the next; its figure sits between.
    memory: ClassVar[Mapping[str, StageMemory]] = {
        # 158-204 MB measured across soaks on two machines: DALI's buffers grow with what was batched
        "image_preprocess": StageMemory(fixed_mb=185, spread=0.3),
        "image_encoder": StageMemory(fixed_mb=62),
        "text_tokenizer": StageMemory(fixed_mb=372),
        "text_encoder": StageMemory(fixed_mb=57),
        SERVER_MEMORY_ROLE: StageMemory(fixed_mb=45),
    }

    @staticmethod
    def make_tiny(directory: Path) -> Path:
        return make_tiny_clip(directory)

    def encode_texts(self, loaded: LoadedClip, texts: list[str], return_tensors: str = "np") -> dict[str, Any]:
        """Texts as the text encoder takes them: the model's tokenizer, padded and truncated to its
        maximum length (what the served tokenizer stage computes)."""
        encoded = loaded.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=loaded.max_text_length,
            return_tensors=return_tensors,
        )
        return {name: encoded[TOKENIZER_OUTPUTS[name]] for name in self.text_inputs}

    # -- tensors ---------------------------------------------------------------------------
    def image_recipe(self, loaded: LoadedClip, options: BuildOptions = BuildOptions()):
        return image_recipe_for(loaded.image_processor, options)

    def tensors(self, loaded: LoadedClip) -> dict[str, Tensor]:
        height, width = self.image_recipe(loaded).output_hw
        length = loaded.max_text_length
        vector = (loaded.embedding_dim,)
        return {
            **EMBEDDINGS.tensors(dims={IMAGE_EMBEDS: vector, TEXT_EMBEDS: vector}),
            CHECKED_IMAGE: Tensor(CHECKED_IMAGE, "uint8", (-1,), ragged=True),
            PIXEL_VALUES: Tensor(PIXEL_VALUES, "float32", (3, height, width)),
            INPUT_IDS: Tensor(INPUT_IDS, "int64", (length,)),
            ATTENTION_MASK: Tensor(ATTENTION_MASK, "int64", (length,)),
        }

    # -- exports ---------------------------------------------------------------------------
    def exports(self, loaded: LoadedClip) -> list[OnnxExport]:
        import torch

        t = self.tensors(loaded)
        generator = torch.Generator().manual_seed(0)
        pixel_shape = t[PIXEL_VALUES].dims
        pixel_samples = [{PIXEL_VALUES: torch.randn((batch, *pixel_shape), generator=generator)} for batch in (2, 1, 5)]
        text_samples = [
            self.encode_texts(loaded, texts, "pt") for texts in (SAMPLE_TEXTS[:2], SAMPLE_TEXTS[2:], SAMPLE_TEXTS[:1])
        ]
        text_inputs = tuple(t[name] for name in self.text_inputs)
        return [
            OnnxExport(
                role="image_encoder",
                module=_image_tower(loaded.model),
                inputs=(t[PIXEL_VALUES],),
                outputs=(t[IMAGE_EMBEDS],),
                sample_inputs=pixel_samples,
                tolerance=self.tolerance("image_encoder"),
            ),
            OnnxExport(
                role="text_encoder",
                module=_text_tower(loaded.model),
                inputs=text_inputs,
                outputs=(t[TEXT_EMBEDS],),
                sample_inputs=text_samples,
                tolerance=self.tolerance("text_encoder"),
            ),
        ]

    # -- pipelines -------------------------------------------------------------------------
    def pipelines(
        self, loaded: LoadedClip, onnx_files: Mapping[str, Path], options: BuildOptions = BuildOptions()
    ) -> list[Pipeline]:
        t = self.tensors(loaded)
        text_inputs = tuple(t[name] for name in self.text_inputs)
        recipe = self.image_recipe(loaded, options)
        preprocess = image_preprocess_stages(
            recipe, t[IMAGE], t[CHECKED_IMAGE], t[PIXEL_VALUES], self.stage_batching("image_preprocess"), options
        )
        image = Pipeline(
            role="image",
            inputs=(t[IMAGE],),
            outputs=(t[IMAGE_EMBEDS],),
            response_cache=True,
            stages=(
                *preprocess,
                encoder_stage(
                    "image_encoder",
                    (t[PIXEL_VALUES],),
                    (t[IMAGE_EMBEDS],),
                    self.stage_batching("image_encoder"),
                    onnx_files["image_encoder"],
                    options,
                ),
            ),
        )
        text = Pipeline(
            role="text",
            inputs=(t[TEXT],),
            outputs=(t[TEXT_EMBEDS],),
            response_cache=True,
            stages=(
                Stage(
                    role="text_tokenizer",
                    template="text_tokenizer",
                    inputs=(t[TEXT],),
                    outputs=text_inputs,
                    batching=self.stage_batching("text_tokenizer"),
                    parameters={"tokenizer_dir": "tokenizer", "max_length": str(loaded.max_text_length)},
                    artefacts=(saved_pretrained("tokenizer", "tokenizer", loaded.tokenizer.save_pretrained),),
                ),
                encoder_stage(
                    "text_encoder",
                    text_inputs,
                    (t[TEXT_EMBEDS],),
                    self.stage_batching("text_encoder"),
                    onnx_files["text_encoder"],
                    options,
                ),
            ),
        )
        return [image, text]

    # -- reduced precision -----------------------------------------------------------------
    precision_thresholds: ClassVar[Mapping[str, Mapping[str, float]]] = {
        "fp16": {"min_cosine": 0.999},
        "bf16": {"min_cosine": 0.995},
        "int8": {"min_cosine": 0.99},
    }

    def precision_data(self, loaded: LoadedClip, exports, onnx_files, calibration_dir):
        """Images (*.jpg, *.png, ...) and captions (*.txt, one per line) from `calibration_dir`,
        or the built-in varied images (`tritonkit.calibration`) and 24 built-in captions. A quarter of
        the user's images (a fifth of the built-in ones: one of each kind) and of the captions is held out."""
        from tritonkit.errors import InputError
        from tritonkit.precision import PrecisionData, data_files, image_feeds, split_files

        images, image_source, heldout_share = calibration_images(calibration_dir)
        if calibration_dir is not None:
            texts = [
                line.strip() for p in data_files(calibration_dir, (".txt",)) for line in p.read_text().splitlines()
            ]
            texts = [t for t in texts if t]
            if not texts:
                raise InputError(f"--calibration-data {calibration_dir}: needs captions too (*.txt, one per line)")
            source = f"{image_source} and {len(texts)} captions"
        else:
            texts = list(CALIBRATION_CAPTIONS)
            source = (
                f"{image_source.removesuffix(': ' + BUILTIN_NOTE)} and {len(texts)} built-in captions: {BUILTIN_NOTE}"
            )

        def pixel_feeds(files):
            return image_feeds(files, loaded.image_processor, PIXEL_VALUES, CALIBRATION_BATCH)

        def text_feeds(captions):
            return [
                {
                    name: value.astype(np.int64)
                    for name, value in self.encode_texts(loaded, captions[i : i + CALIBRATION_BATCH]).items()
                }
                for i in range(0, len(captions), CALIBRATION_BATCH)
            ]

        image_calibration, image_heldout = split_files(images, heldout_share)
        text_calibration, text_heldout = split_files(texts)
        return PrecisionData(
            calibration={"image_encoder": pixel_feeds(image_calibration), "text_encoder": text_feeds(text_calibration)},
            heldout={"image_encoder": pixel_feeds(image_heldout), "text_encoder": text_feeds(text_heldout)},
            source=source,
            builtin=calibration_dir is None,
        )

    # -- reference -------------------------------------------------------------------------
    def reference_image_embeds(self, loaded: LoadedClip, images) -> Any:
        """What the image ensemble must return: CLIPModel features of the processor's pixels."""
        import torch

        pixels = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return projected(loaded.model.get_image_features(pixel_values=pixels)).numpy()

    def reference_text_embeds(self, loaded: LoadedClip, texts: list[str]) -> Any:
        import torch

        encoded = self.encode_texts(loaded, texts, "pt")
        with torch.no_grad():
            return projected(
                loaded.model.get_text_features(**{TOKENIZER_OUTPUTS[name]: value for name, value in encoded.items()})
            ).numpy()


# -- the tiny model (tests, the demo): random weights, a real architecture and tokenizer --------
CLIP_BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def clip_bpe_path() -> Path:
    import importlib.metadata

    try:
        path = Path(str(importlib.metadata.distribution("open_clip_torch").locate_file(CLIP_BPE_FILE)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise TritonkitError("the CLIP BPE merges file is not installed", hint="pip install --no-deps open_clip_torch")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The 49408-token OpenAI CLIP vocabulary, built the way CLIP's SimpleTokenizer builds it."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as merges_file:
        lines = merges_file.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    from tritonkit.tiny import bytes_to_unicode

    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_clip_tokenizer(directory: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]  # what the tokenizers backend takes (its stub says list[str])
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)  # type: ignore[arg-type]
    tokenizer.save_pretrained(str(directory))


def make_tiny_clip(
    directory: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    projection_dim: int = 32,
    image_size: int = 224,
    patch_size: int = 32,
    seed: int = 0,
) -> Path:
    """A random CLIPModel + real tokenizer + CLIPImageProcessor, saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden_size, intermediate_size=hidden_size * 4, num_hidden_layers=layers, num_attention_heads=heads
    )
    config = CLIPConfig(
        text_config=dict(common, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(common, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    CLIPModel(config).eval().save_pretrained(str(directory))
    write_clip_tokenizer(directory)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(directory))
    return directory


def make_vit_b32_clip(directory: Path, seed: int = 0) -> Path:
    """A random-initialised CLIP with openai/clip-vit-base-patch32's architecture, for speed figures."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=512,
    )
    CLIPModel(config).eval().save_pretrained(str(directory))
    write_clip_tokenizer(directory)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        str(directory)
    )
    return directory
