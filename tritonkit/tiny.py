"""Small random-initialised models with real architectures and real tokenizers.

Nothing can be downloaded from a model hub here, so tests and the demo build their models from
configs. The CLIP tokenizer is OpenAI's real BPE, taken from the merges file that the
open_clip_torch wheel ships (install it with `pip install --no-deps open_clip_torch`).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

from tritonkit.errors import TritonkitError

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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The 49408-token OpenAI CLIP vocabulary, built the way CLIP's SimpleTokenizer builds it."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as merges_file:
        lines = merges_file.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
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


WHISPER_SPECIALS = (
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)


def multilingual_whisper_tokenizer_json() -> dict:
    """Whisper's multilingual token layout (51865 ids) on the English BPE of the bundled tiny.en.

    Multilingual Whisper has one more ordinary token than English Whisper, so every special token
    sits one id higher (<|endoftext|> 50257, <|startoftranscript|> 50258, languages from 50259).
    The extra ordinary token at 50256 is a placeholder no merge produces; random weights make the
    exact BPE irrelevant, the id layout is what decoding depends on.
    """
    import copy
    import json

    from tritonkit.convert_ct2 import bundled_tiny_en

    english = json.loads((bundled_tiny_en() / "tokenizer.json").read_text())
    data = copy.deepcopy(english)
    vocab = data["model"]["vocab"]
    end_of_text = vocab.pop("<|endoftext|>")
    vocab["<|tritonkit-placeholder|>"] = end_of_text
    shift = {t["id"]: t["id"] + 1 for t in data["added_tokens"]}
    for token in data["added_tokens"]:
        token["id"] = shift[token["id"]]
    for special in data["post_processor"]["special_tokens"].values():
        special["ids"] = [shift.get(i, i) for i in special["ids"]]
    return data


def make_tiny_whisper(
    directory: Path,
    *,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 2,
    max_length: int = 48,
    init_std: float = 0.5,
    seed: int = 0,
) -> Path:
    """A random multilingual WhisperForConditionalGeneration with Whisper's real token layout.

    Decoding stops after `max_length` tokens (the generation config's max_length): random weights
    seldom choose the end token, so this keeps tests quick. With the usual init (std 0.02) every
    input decodes to the same tokens; `init_std` 0.5 makes tokens and detected languages depend
    on the audio, which is what the tests need to tell inputs and options apart.
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from tritonkit.convert_ct2 import save_whisper_processor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = multilingual_whisper_tokenizer_json()
    ids = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    languages = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in ids}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    # Whisper suppresses a fixed list of punctuation-like ordinary tokens plus the special ones.
    suppress = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93]
    suppress += [ids[s] for s in WHISPER_SPECIALS[:-1]]
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=end,
        bos_token_id=end,
        eos_token_id=end,
        decoder_start_token_id=start,
        suppress_tokens=suppress,
        begin_suppress_tokens=[220, end],
        init_std=init_std,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        max_length=max_length,
        suppress_tokens=suppress,
        begin_suppress_tokens=[220, end],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        max_initial_timestamp_index=50,
        is_multilingual=True,
        lang_to_id=languages,
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        return_timestamps=False,
    )
    model.save_pretrained(str(directory))
    save_whisper_processor(directory, tokenizer_json, config)
    return directory


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

    from tritonkit.convert_ct2 import bundled_tiny_en

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer, processors

    bpe = Tokenizer.from_file(str(bundled_tiny_en() / "tokenizer.json"))
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
    (directory / "tritonkit_tiny.json").write_text(json.dumps({"made_by": "tritonkit.tiny.make_tiny_llava"}))
    return directory


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
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tritonkit.convert_ct2 import bundled_tiny_en

    if variant not in ("qwen2_vl", "qwen2_5_vl"):
        raise TritonkitError(f"Qwen-VL variant {variant!r}: use qwen2_vl or qwen2_5_vl")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer.from_file(str(bundled_tiny_en() / "tokenizer.json"))
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
        json.dumps({"made_by": f"tritonkit.tiny.make_tiny_qwen_vl({variant})"})
    )
    return directory
