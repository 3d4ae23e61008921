"""What Qwen2-VL and Qwen2.5-VL compute outside the graphs, shared by the build, the vision
encoder's and the decoder's Python-backend models: the inputs of the vision graph for a ragged
batch of images, and the language model's multimodal rotary positions (M-RoPE).

Images are resized by the checkpoint's own processor to their own grid of patches (t, h, w), so
each image has its own number of patches and of visual tokens (t*h*w / merge²). The vision graph
takes the patches of several images at once with, per patch, its rotary (row, column) position and
the image it belongs to; attention stays within an image (and, for Qwen2.5-VL's windowed layers,
within a window), which transformers does with per-image attention calls and the graph with a
block mask built from those ids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np


@dataclass(frozen=True)
class VisionLayout:
    """The vision tower's geometry (from its config)."""

    merge_size: int
    patch_size: int
    window_size: int = 0  # Qwen2.5-VL: pixels per attention window side; 0 = every layer attends whole images

    @property
    def windowed(self) -> bool:
        return self.window_size > 0

    @classmethod
    def from_config(cls, vision_config) -> VisionLayout:
        return cls(
            merge_size=int(vision_config.spatial_merge_size),
            patch_size=int(vision_config.patch_size),
            window_size=int(getattr(vision_config, "window_size", 0) or 0)
            if getattr(vision_config, "fullatt_block_indexes", None) is not None
            else 0,
        )


MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses longer strips
# The DALI pipeline's second input: each image's resized (height, width).
RESIZED_SIZE = "RESIZED_SIZE"


@dataclass(frozen=True)
class PatchRecipe:
    """The checkpoint's image processor settings: what the DALI pipeline and the size arithmetic
    of the preprocessing stage need (resize within the pixel budget, normalisation, patches)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, float, float]  # on 0..1 pixels, after the rescale
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL's filter number (3 = bicubic)
    exif_orientation: bool = True

    @classmethod
    def from_processor(cls, processor, exif_orientation: bool = True) -> PatchRecipe:
        min_pixels, max_pixels = pixel_budget(processor)
        return cls(
            patch_size=int(processor.patch_size),
            merge_size=int(processor.merge_size),
            temporal_patch_size=int(processor.temporal_patch_size),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            mean=tuple(float(x) for x in processor.image_mean),  # type: ignore[arg-type]
            std=tuple(float(x) for x in processor.image_std),  # type: ignore[arg-type]
            rescale_factor=float(processor.rescale_factor),
            resample=int(processor.resample),
            exif_orientation=exif_orientation,
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_values(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def resized(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid(self, resized_height: int, resized_width: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of one image at its resized size."""
        return 1, int(resized_height) // self.patch_size, int(resized_width) // self.patch_size

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PatchRecipe:
        data = json.loads(text)
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})


def pixel_budget(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL image processor (its `size`, in either spelling)."""
    size = dict(processor.size)
    return int(size.get("shortest_edge") or size["min_pixels"]), int(size.get("longest_edge") or size["max_pixels"])


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL's image processor resizes an image to: both sides multiples of `factor`,
    the area within [min_pixels, max_pixels], the aspect ratio kept as closely as that allows
    (transformers' `smart_resize`, with its rounding; a strip over 200:1 is an InputError)."""
    from tritonkit.errors import InputError

    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise InputError(
            f"IMAGE: {width}x{height} is over the {MAX_ASPECT_RATIO}:1 aspect ratio Qwen-VL's processor accepts",
            reason="too_large",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(grid: Sequence[int], merge_size: int) -> int:
    """Visual tokens (language-model positions) of one image's (t, h, w) patch grid."""
    t, h, w = (int(x) for x in grid)
    return t * h * w // (merge_size * merge_size)


def vision_inputs(grids: np.ndarray, layout: VisionLayout) -> dict[str, np.ndarray]:
    """The vision graph's index inputs for images with these (t, h, w) grids, as transformers'
    vision_utils computes them: POSITIONS [N, 2] (rotary row/column of each patch, merge blocks
    first), SEGMENTS [N] (which image/frame), and for windowed towers WINDOW_INDEX [N / merge²] (the
    window order of merge units) and WINDOW_SEGMENTS [N] (the window of each patch in that order)."""
    import torch
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grid = torch.as_tensor(np.asarray(grids, dtype=np.int64).reshape(-1, 3))
    positions = get_vision_position_ids(grid, layout.merge_size).numpy().astype(np.int64)
    lengths = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0]).numpy()
    segments = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    feed = {"POSITIONS": positions, "SEGMENTS": segments}
    if layout.windowed:
        index, cumulative = get_vision_window_index(grid, layout.merge_size, layout.window_size, layout.patch_size)
        bounds = cumulative.numpy()
        feed["WINDOW_INDEX"] = index.numpy().astype(np.int64)
        feed["WINDOW_SEGMENTS"] = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(bounds))
    return feed


def vision_module(visual, layout: VisionLayout):
    """The vision tower and patch merger as one exportable module: (PATCHES [N, C*T*P*P], POSITIONS,
    SEGMENTS[, WINDOW_INDEX, WINDOW_SEGMENTS]) -> IMAGE_FEATURES [N / merge², text hidden], equal to
    `visual(pixel_values, grid_thw).pooler_output`. The blocks' own norms, projections and MLPs run
    as they are; only attention is written out, with the block mask in place of per-image calls."""
    import sys

    import torch

    rotary_apply = sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision
    unit = layout.merge_size**2
    full_blocks = set(getattr(visual, "fullatt_block_indexes", ()) or ())

    def attention(block, hidden, cos, sin, allowed):
        attn = block.attn
        count = hidden.shape[0]
        q, k, v = attn.qkv(hidden).reshape(count, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotary_apply(q, k, cos, sin)
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [heads, N, head_dim]
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return attn.proj(out.transpose(0, 1).reshape(count, -1))

    def in_window_order(x, index):
        count = x.shape[0]
        return x.reshape(count // unit, unit, -1)[index].reshape(count, *x.shape[1:])

    class VisionEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual

        def forward(self, patches, positions, segments, window_index=None, window_segments=None):
            hidden = self.visual.patch_embed(patches)
            cos, sin = self.visual.rotary_pos_emb(hidden, positions)
            if layout.windowed:
                hidden = in_window_order(hidden, window_index)
                cos, sin = in_window_order(cos, window_index), in_window_order(sin, window_index)
                segments = in_window_order(segments[:, None], window_index)[:, 0]
                windows = window_segments[:, None] == window_segments[None, :]
            whole = segments[:, None] == segments[None, :]
            for number, block in enumerate(self.visual.blocks):
                allowed = windows if layout.windowed and number not in full_blocks else whole
                hidden = hidden + attention(block, block.norm1(hidden), cos, sin, allowed)
                hidden = hidden + block.mlp(block.norm2(hidden))
            merged = self.visual.merger(hidden)
            if layout.windowed:
                merged = merged[torch.argsort(window_index)]
            return merged

    return VisionEncoder().eval()


def mrope_positions(ids: Sequence[int], image_token_id: int, grids: Sequence[Sequence[int]], merge_size: int):
    """M-RoPE position ids [3, len(ids)] of one prompt (no padding) and its rope delta (the next
    token's position minus its index), as transformers' `get_rope_index` gives them: text tokens
    count up on all three axes; an image's tokens take (start + t, start + row, start + column)
    and the text after it resumes at start + max(rows, columns)."""
    tokens = np.asarray(ids)
    pieces, current, at, images = [], 0, 0, iter(grids)
    while at < len(tokens):
        if tokens[at] == image_token_id:
            t, h, w = (int(x) for x in next(images))
            rows, columns = h // merge_size, w // merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(rows), np.arange(columns), indexing="ij")
            pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            at += t * rows * columns
            current += max(h, w) // merge_size
        else:
            end = at
            while end < len(tokens) and tokens[end] != image_token_id:
                end += 1
            pieces.append(np.broadcast_to(np.arange(end - at) + current, (3, end - at)))
            current += end - at
            at = end
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    delta = int(positions.max()) + 1 - len(tokens) if len(tokens) else 0
    return positions.astype(np.int64), delta


LM_HEAD_FILE = "lm_head.safetensors"


def save_language_model(model, path: str) -> None:
    """The language model of a Qwen-VL model (its text model, saved with save_pretrained, and its
    output head beside it): what the decoder loads, without the vision tower's weights."""
    from safetensors.torch import save_file

    model.model.language_model.save_pretrained(path)
    save_file({"weight": model.lm_head.weight.detach().contiguous()}, str(Path(path) / LM_HEAD_FILE))


def load_language_model(path: str):
    """The saved language model as a causal LM that ChatGenerator drives: it takes inputs_embeds or
    input_ids with M-RoPE position ids [4, B, L] (text positions, then t/h/w) and returns logits and
    its cache."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    class VisionLanguageLM(torch.nn.Module):
        def __init__(self, text, head):
            super().__init__()
            self.text = text
            self.head = head
            self.config = text.config

        def get_input_embeddings(self):
            return self.text.get_input_embeddings()

        def forward(
            self,
            input_ids=None,
            inputs_embeds=None,
            attention_mask=None,
            position_ids=None,
            past_key_values=None,
            use_cache=True,
            logits_to_keep=0,
        ):
            out = self.text(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=past_key_values,
                use_cache=use_cache,
            )
            hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
            return SimpleNamespace(logits=self.head(hidden), past_key_values=out.cache)

    text = AutoModel.from_pretrained(path)
    weight = load_file(str(Path(path) / LM_HEAD_FILE))["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data.copy_(weight)
    return VisionLanguageLM(text, head).eval()
