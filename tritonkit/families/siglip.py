"""SigLIP: CLIP's contract (NAME_image, NAME_text) with SigLIP's towers.

What differs from CLIP, and nothing else: `SiglipModel`; images resized to the processor's size
without a crop; text padded to the processor's maximum length and encoded without an attention
mask; embeddings as wide as the towers' pooled outputs (there is no projection_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonkit.families.base import register
from tritonkit.families.clip import CALIBRATION_CAPTIONS, INPUT_IDS, SAMPLE_TEXTS, ClipSpec, LoadedClip


@dataclass
class LoadedSiglip(LoadedClip):
    @property
    def embedding_dim(self) -> int:
        text = self.model.config.text_config
        return int(getattr(text, "projection_size", None) or text.hidden_size)


@register
class SiglipSpec(ClipSpec):
    name = "siglip"
    model_types = ("siglip",)
    description = "SigLIP image and text towers -> ensembles NAME_image and NAME_text"
    model_class = "SiglipModel"
    loaded_class = LoadedSiglip
    text_inputs = (INPUT_IDS,)

    @staticmethod
    def make_tiny(directory: Path, seed: int = 0) -> Path:
        """A random SiglipModel, a Unigram tokenizer trained here (SentencePiece-style, as SigLIP's
        own: lower-cased, `</s>` ends and pads, no attention mask) and a SiglipImageProcessor."""
        import torch
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

        from tritonkit.samples import SENTENCES
        from tritonkit.tiny import unigram_tokenizer

        directory = Path(directory)
        tokenizer = unigram_tokenizer(
            [*CALIBRATION_CAPTIONS, *SENTENCES, *SAMPLE_TEXTS], ["<pad>", "</s>", "<unk>"], 256, lowercase=True
        )
        eos = tokenizer.token_to_id("</s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="<unk>",
            pad_token="</s>",
            eos_token="</s>",
            model_max_length=64,
            model_input_names=["input_ids"],
        ).save_pretrained(str(directory))
        torch.manual_seed(seed)
        common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        config = SiglipConfig(
            text_config={
                **common,
                "vocab_size": tokenizer.get_vocab_size(),
                "max_position_embeddings": 64,
                "pad_token_id": eos,
                "eos_token_id": eos,
                "bos_token_id": None,
            },
            vision_config={**common, "image_size": 32, "patch_size": 8},
        )
        SiglipModel(config).eval().save_pretrained(str(directory))
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(directory))
        return directory
