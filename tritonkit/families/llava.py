"""LLaVA: image question answering. The vision tower plus the multimodal projector is the encoder
(ONNX); the language model generates in a Python-backend decoder that builds the input embeddings
the way `LlavaForConditionalGeneration` does (chat template, `<image>` expanded to one token per
image feature, features in place of those tokens)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tritonkit.chat_decoding import DEFAULT_MAX_PROMPT_BYTES
from tritonkit.contracts import (
    CHAT,
    COMPLETION_TOKENS,
    FINISH_REASON,
    IMAGE,
    IMAGES,
    LOGPROBS,
    MAX_NEW_TOKENS,
    MESSAGES,
    PROMPT,
    PROMPT_TOKENS,
    RESPONSE_FORMAT,
    SEED,
    STOP,
    TEMPERATURE,
    TEXT,
    TOP_LOGPROBS,
    TOP_P,
)
from tritonkit.errors import InputError
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
    flag,
    image_preprocess_stages,
    image_recipe_for,
    register,
    saved_pretrained,
)
from tritonkit.triton_config import Batching, Tensor

IMAGE_INPUTS = (IMAGE, IMAGES)  # what a text-only turn's ensemble leaves out (Qwen-VL takes IMAGES)
# Between composing models.
PIXEL_VALUES = "PIXEL_VALUES"
CHECKED_IMAGE = "CHECKED_IMAGE"
IMAGE_FEATURES = "IMAGE_FEATURES"

DEFAULT_MAX_NEW_TOKENS = 256
# Repeated images skip the encoder: it keeps this many images' features (keyed by their pixels).
FEATURE_CACHE_ENTRIES = 256


@dataclass(frozen=True)
class ChatBuildOptions(ImageOptions):
    """A chat family's build options: its images', and the prompt limit."""

    max_prompt_bytes: int | None = flag(
        "Largest prompt, checked before tokenizing (default 65536); its tokens must also fit the context."
    )

    def __post_init__(self):
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise InputError(f"--max-prompt-bytes must be >= 1, got {self.max_prompt_bytes}")


@dataclass
class LoadedLlava:
    model: Any  # LlavaForConditionalGeneration
    processor: Any  # LlavaProcessor

    @property
    def image_tokens(self) -> int:
        """Image features (= `<image>` tokens) per image."""
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        strategy = self.model.config.vision_feature_select_strategy
        return patches if strategy == "default" else patches + 1

    @property
    def text_hidden(self) -> int:
        return int(self.model.config.text_config.hidden_size)


def _vision_encoder(model):
    """pixel_values -> projected image features [B, tokens, text hidden], as get_image_features."""
    import torch

    config = model.config
    layer = config.vision_feature_layer

    class VisionEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = model.model.vision_tower
            self.projector = model.model.multi_modal_projector

        def forward(self, pixel_values):
            hidden = self.vision(pixel_values, output_hidden_states=True).hidden_states
            if isinstance(layer, int):
                selected = hidden[layer]
                if config.vision_feature_select_strategy == "default":
                    selected = selected[:, 1:]
            else:
                pool = [
                    hidden[i][:, 1:] if config.vision_feature_select_strategy == "default" else hidden[i] for i in layer
                ]
                selected = torch.cat(pool, dim=-1)
            return self.projector(selected)

    return VisionEncoder().eval()


def language_model(model):
    """A causal LM with the LLaVA language model's weights (what the decoder runs)."""
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_config(model.config.text_config)
    causal.model.load_state_dict(model.model.language_model.state_dict())
    causal.lm_head.load_state_dict(model.lm_head.state_dict())
    causal.generation_config = model.generation_config
    return causal.eval()


@register
class LlavaSpec(FamilySpec):
    name = "llava"
    contract = CHAT
    options_class = ChatBuildOptions
    model_types = ("llava",)
    description = (
        "LLaVA image question answering -> ensembles NAME_chat and NAME_chat_stream "
        "(IMAGE + PROMPT or MESSAGES in, TEXT out), NAME_chat_text and NAME_chat_text_stream (no image)"
    )
    model_class = "LlavaForConditionalGeneration"
    processor_classes: ClassVar[Mapping[str, str]] = {"processor": "AutoProcessor"}
    loaded_class = LoadedLlava
    tolerances: ClassVar[Mapping[str, Tolerance]] = {"vision_encoder": Tolerance(max_abs=1e-4, min_cosine=0.9999)}
    batching: ClassVar[Mapping[str, Batching]] = {
        "image_preprocess": Batching(max_batch_size=16, preferred_batch_sizes=(8, 16), max_queue_delay_us=2000),
        "vision_encoder": Batching(max_batch_size=16, preferred_batch_sizes=(4, 8, 16), max_queue_delay_us=2000),
        "decoder": Batching(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=5000),
        "decoder_stream": Batching(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=5000),
    }
    # Fixed resident memory per stage, measured with the tiny LLaVA under jemalloc (the default
    # allocator; `python scripts/memory_before_after.py --allocators glibc jemalloc --family llava`:
    # three 90 s soaks at concurrency 16, `tritonkit plan --measure` after each, every process charged
    # its share of the pages the server's processes map, as a pod's limit charges them;
    # docs/RELIABILITY.md): the language model in PyTorch with its tokenizer and chat template,
    # DALI's decoding buffers (what they grew to under the load seen: the same soak measured the image
    # preprocessing at 176-178 MB one hour and 139 MB the next; its figure sits between).
    memory: ClassVar[Mapping[str, StageMemory]] = {
        "image_preprocess": StageMemory(fixed_mb=150, spread=0.3),  # 121-178 MB measured across soaks
        "vision_encoder": StageMemory(fixed_mb=66),
        "decoder": StageMemory(fixed_mb=362),
        "decoder_stream": StageMemory(fixed_mb=334),
        SERVER_MEMORY_ROLE: StageMemory(fixed_mb=31),
    }

    @staticmethod
    def make_tiny(directory: Path) -> Path:
        """A small random LLaVA: CLIP vision tower, small Llama, GPT-2 BPE with LLaVA's <image> token."""
        return make_tiny_llava(directory)

    def tensors(self, loaded: LoadedLlava) -> dict[str, Tensor]:
        height, width = image_recipe_for(loaded.processor.image_processor, BuildOptions()).output_hw
        return {
            **CHAT.tensors(without=(IMAGES,)),  # one image a request
            CHECKED_IMAGE: Tensor(CHECKED_IMAGE, "uint8", (-1,), ragged=True),
            PIXEL_VALUES: Tensor(PIXEL_VALUES, "float32", (3, height, width)),
            IMAGE_FEATURES: Tensor(IMAGE_FEATURES, "float32", (loaded.image_tokens, loaded.text_hidden)),
        }

    def exports(self, loaded: LoadedLlava) -> list[OnnxExport]:
        import torch

        t = self.tensors(loaded)
        generator = torch.Generator().manual_seed(0)
        samples = [
            {PIXEL_VALUES: torch.randn((batch, *t[PIXEL_VALUES].dims), generator=generator)} for batch in (2, 1, 3)
        ]
        return [
            OnnxExport(
                role="vision_encoder",
                module=_vision_encoder(loaded.model),
                inputs=(t[PIXEL_VALUES],),
                outputs=(t[IMAGE_FEATURES],),
                sample_inputs=samples,
                tolerance=self.tolerance("vision_encoder"),
            )
        ]

    def pipelines(
        self, loaded: LoadedLlava, onnx_files: Mapping[str, Path], options: BuildOptions = BuildOptions()
    ) -> list[Pipeline]:
        t = self.tensors(loaded)
        # both decoders (whole and streaming) ship the same two folders, made once
        saved = (
            saved_pretrained(
                "language model (PyTorch)",
                "language_model",
                lambda path: language_model(loaded.model).save_pretrained(path),
            ),
            saved_pretrained("processor", "processor", loaded.processor.save_pretrained),
        )
        recipe = image_recipe_for(loaded.processor.image_processor, options)
        image_stages = image_preprocess_stages(
            recipe, t[IMAGE], t[CHECKED_IMAGE], t[PIXEL_VALUES], self.stage_batching("image_preprocess"), options
        )
        encoder = encoder_stage(
            "vision_encoder",
            (t[PIXEL_VALUES],),
            (t[IMAGE_FEATURES],),
            self.stage_batching("vision_encoder"),
            onnx_files["vision_encoder"],
            options,
        )
        if encoder.template == "onnx_encoder":
            encoder = replace(
                encoder, parameters={**encoder.parameters, "feature_cache_entries": str(FEATURE_CACHE_ENTRIES)}
            )
        options_in = (t[MAX_NEW_TOKENS], t[TEMPERATURE], t[TOP_P], t[SEED], t[STOP], t[MESSAGES])
        decoders = chat_decoders(self, loaded, t, options, options_in, saved, {"processor_dir": "processor"})
        return chat_pipelines(t, (t[IMAGE], t[PROMPT], *options_in), (*image_stages, encoder), decoders)

    # -- reduced precision -----------------------------------------------------------------
    precision_thresholds: ClassVar[Mapping[str, Mapping[str, float]]] = {
        "fp16": {"min_cosine": 0.999},
        "bf16": {"min_cosine": 0.995},
        "int8": {"min_cosine": 0.99},
    }

    def precision_data(self, loaded: LoadedLlava, exports, onnx_files, calibration_dir):
        """Images (*.jpg, *.png, ...) from `calibration_dir` (a quarter held out), or the built-in
        varied images (`tritonkit.calibration`; one of each kind held out)."""
        from tritonkit.calibration import calibration_images
        from tritonkit.precision import PrecisionData, image_feeds, split_files

        images, source, heldout_share = calibration_images(calibration_dir)

        def feeds(files):
            return image_feeds(files, loaded.processor.image_processor, PIXEL_VALUES)

        calibration, heldout = split_files(images, heldout_share)
        return PrecisionData(
            calibration={"vision_encoder": feeds(calibration)},
            heldout={"vision_encoder": feeds(heldout)},
            source=source,
            builtin=calibration_dir is None,
        )

    # -- reference (tests) -----------------------------------------------------------------
    def reference_tokens(
        self, loaded: LoadedLlava, pixel_values: np.ndarray | None, prompt: str | list[dict], max_new_tokens: int
    ) -> list[int]:
        """transformers `generate` (greedy) on these pixels: the tokens the chat ensemble must return
        for a prompt, or for a conversation (messages with one {"type": "image"} part); without
        pixels, a text-only turn (what NAME_chat_text must return)."""
        import torch

        image = [{"type": "image"}] if pixel_values is not None else []
        if isinstance(prompt, str):
            text = loaded.processor.apply_chat_template(
                [{"role": "user", "content": [*image, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True,
            )
        else:
            text = loaded.processor.apply_chat_template(prompt, add_generation_prompt=True)
        image_tokens = "<image>" * loaded.image_tokens
        ids = loaded.processor.tokenizer(text.replace("<image>", image_tokens), return_tensors="pt")["input_ids"]
        pixels = {"pixel_values": torch.from_numpy(pixel_values)} if pixel_values is not None else {}
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                **pixels,
            )
        return out[0, ids.shape[1] :].tolist()


def chat_decoders(
    spec: FamilySpec,
    loaded,
    t: Mapping[str, Tensor],
    options: BuildOptions,
    options_in: tuple[Tensor, ...],
    artefacts: tuple,
    parameters: Mapping[str, str],
) -> tuple[Stage, Stage]:
    """A chat family's whole-answer and streaming decoders (the chat_decoder template), with the
    family's own `parameters` (its processor folder, Qwen-VL's M-RoPE) beside the shared ones."""
    shared = {
        "language_model_dir": "language_model",
        **parameters,
        "max_new_tokens": str(DEFAULT_MAX_NEW_TOKENS),
        "image_token_id": str(loaded.model.config.image_token_id),
        "eos_token_ids": json.dumps(_eos_ids(loaded.model)),
        "max_prompt_bytes": str(spec.family_options(options).max_prompt_bytes or DEFAULT_MAX_PROMPT_BYTES),
    }
    if options.gpu:
        shared["device"] = "cuda"
    usage = (t[PROMPT_TOKENS], t[COMPLETION_TOKENS], t[FINISH_REASON], t[LOGPROBS])

    def decoder(role: str, stream: bool) -> Stage:
        return Stage(
            role=role,
            template="chat_decoder",
            # no image features: a text-only turn (the NAME_chat_text ensembles)
            inputs=(
                replace(t[IMAGE_FEATURES], optional=True),
                t[PROMPT],
                *options_in,
                t[TOP_LOGPROBS],
                t[RESPONSE_FORMAT],
            ),
            outputs=(t[TEXT], *usage),
            batching=spec.stage_batching(role),
            parameters=shared,
            artefacts=artefacts,
            kind="KIND_GPU" if options.gpu else "KIND_CPU",
            config_extra={"model_transaction_policy": {"decoupled": True}} if stream else {},
        )

    return decoder("decoder", False), decoder("decoder_stream", True)


def chat_pipelines(t: Mapping[str, Tensor], inputs: tuple[Tensor, ...], front: tuple[Stage, ...], decoders):
    """NAME_chat and NAME_chat_stream: the image stages, then the whole-answer or streaming decoder;
    NAME_chat_text and NAME_chat_text_stream: a turn without images, straight to the same decoders
    (its rows share their steps with the image turns')."""
    outputs = (t[TEXT], t[PROMPT_TOKENS], t[COMPLETION_TOKENS], t[FINISH_REASON], t[LOGPROBS])
    inputs = (*inputs, t[TOP_LOGPROBS], t[RESPONSE_FORMAT])
    text_inputs = tuple(tensor for tensor in inputs if tensor.name not in IMAGE_INPUTS)
    whole, stream = decoders
    return [
        Pipeline("chat", inputs, outputs, (*front, whole)),
        Pipeline("chat_stream", inputs, outputs, (*front, stream)),
        Pipeline("chat_text", text_inputs, outputs, (whole,)),
        Pipeline("chat_text_stream", text_inputs, outputs, (stream,)),
    ]


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.text_config.eos_token_id
    return sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})


# -- the tiny model (tests, the demo): random weights, a real architecture and tokenizer --------
# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as llava-hf's chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def make_tiny_llava(
    directory: Path,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    layers: int = 2,
    init_std: float = 0.2,
    seed: int = 0,
) -> Path:
    """A random LlavaForConditionalGeneration: a CLIP vision tower and a small Llama, with a real
    BPE tokenizer (GPT-2's, from the bundled Whisper tiny.en) plus LLaVA's `<image>` token and
    chat template, and a CLIPImageProcessor; saved with save_pretrained.

    `init_std` above the usual 0.02 makes the generated tokens depend on the image and prompt."""
    import json

    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from tritonkit.tiny import gpt2_bpe

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from tokenizers import processors

    bpe = gpt2_bpe()
    bos = bpe.token_to_id("<|endoftext|>")
    # Whisper's post-processor adds its task tokens; a causal LM's adds just BOS (as Llama's does).
    bpe.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    # image_token_id and initializer_range are read by transformers 5 but not in LlavaConfig's signature
    extra: dict[str, Any] = {"image_token_id": image_token_id, "initializer_range": init_std}
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        **extra,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(directory))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=LLAVA_CHAT_TEMPLATE,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(str(directory))
    (directory / "tritonkit_tiny.json").write_text(json.dumps({"made_by": "tritonkit.families.llava.make_tiny_llava"}))
    return directory
