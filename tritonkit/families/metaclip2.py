"""MetaCLIP 2: Meta's worldwide CLIP (300+ languages), on CLIP's contract (NAME_image, NAME_text).

What differs from CLIP, and nothing else: `MetaClip2Model` (CLIP's towers, the text pooled at the
first end token); a multilingual SentencePiece tokenizer (XLM-V's, `<s> ... </s>`, pad id 1) in
place of CLIP's BPE. Real checkpoints: facebook/metaclip-2-worldwide-huge-quickgelu and its kin.
"""

from __future__ import annotations

from pathlib import Path

from tritonkit.families.base import register
from tritonkit.families.clip import CALIBRATION_CAPTIONS, SAMPLE_TEXTS, ClipSpec


@register
class MetaClip2Spec(ClipSpec):
    name = "metaclip2"
    model_types = ("metaclip_2",)
    description = "MetaCLIP 2 (worldwide, multilingual) image and text towers -> ensembles NAME_image and NAME_text"
    model_class = "MetaClip2Model"

    @staticmethod
    def make_tiny(directory: Path, seed: int = 0) -> Path:
        """A random MetaClip2Model, a Unigram tokenizer trained here on English, German, French,
        Spanish and Japanese captions (XLM-R's special tokens and template, as MetaCLIP 2's own)
        and a CLIPImageProcessor."""
        import torch
        from tokenizers import processors
        from transformers import CLIPImageProcessor, MetaClip2Config, MetaClip2Model, PreTrainedTokenizerFast

        from tritonkit.samples import SENTENCES
        from tritonkit.tiny import unigram_tokenizer

        directory = Path(directory)
        worldwide = [
            "ein Foto von einer Katze",
            "une photo d'un chien dans la neige",
            "una foto de un coche rojo",
            "猫の写真",
            "Ünïcødé text, numbers 1234 and #tags",
        ]
        texts = [*CALIBRATION_CAPTIONS, *SENTENCES, *SAMPLE_TEXTS, *worldwide]
        tokenizer = unigram_tokenizer(texts, ["<s>", "<pad>", "</s>", "<unk>"], 300)  # ids 0-3, as XLM-R's
        bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            model_max_length=32,
            model_input_names=["input_ids", "attention_mask"],
        ).save_pretrained(str(directory))
        torch.manual_seed(seed)
        common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        config = MetaClip2Config(
            text_config={
                **common,
                "vocab_size": tokenizer.get_vocab_size(),
                "max_position_embeddings": 32,
                "bos_token_id": bos,
                "eos_token_id": eos,
                "pad_token_id": tokenizer.token_to_id("<pad>"),
            },
            vision_config={**common, "image_size": 224, "patch_size": 32},
            projection_dim=24,
        )
        MetaClip2Model(config).eval().save_pretrained(str(directory))
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            str(directory)
        )
        return directory
