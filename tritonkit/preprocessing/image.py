"""Image bytes -> normalized CHW float32, matching a transformers image processor.

The recipe is read from the model's own image processor, so the served pipeline computes what
`CLIPImageProcessor` computes: PIL decode, RGBA composited onto white, resize of the shortest
edge with the processor's filter (transformers' integer truncation of the long edge), a center
crop at floor offsets, rescale, normalize.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from tritonkit.errors import InputError

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class ImageRecipe:
    shortest_edge: int | None  # resize the shortest edge to this, keeping aspect ratio
    resize_height: int | None  # or resize to exactly this size (SigLIP-style processors)
    resize_width: int | None
    crop_height: int | None  # center crop, when set
    crop_width: int | None
    resample: int  # PIL resampling filter
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.crop_height:
            return self.crop_height, self.crop_width
        if self.resize_height:
            return self.resize_height, self.resize_width
        raise ValueError("recipe without crop or fixed resize has no fixed output size")

    @classmethod
    def from_processor(cls, processor) -> "ImageRecipe":
        """Read the settings of a transformers image processor (CLIPImageProcessor and kin)."""
        size = dict(processor.size or {}) if getattr(processor, "do_resize", True) else {}
        crop = dict(processor.crop_size or {}) if getattr(processor, "do_center_crop", False) else {}
        resample = processor.resample if processor.resample is not None else Image.BICUBIC
        return cls(
            shortest_edge=size.get("shortest_edge"),
            resize_height=size.get("height"),
            resize_width=size.get("width"),
            crop_height=crop.get("height"),
            crop_width=crop.get("width"),
            resample=int(resample),
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else None,
            mean=tuple(float(m) for m in processor.image_mean) if processor.do_normalize else None,
            std=tuple(float(s) for s in processor.image_std) if processor.do_normalize else None,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ImageRecipe":
        data = json.loads(text)
        for key in ("mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def decode_image(data: bytes, recipe: ImageRecipe) -> Image.Image:
    """Decode encoded image bytes to RGB; every failure is an InputError naming the cause."""
    if len(data) == 0:
        raise InputError("IMAGE: empty input (0 bytes)")
    if len(data) > recipe.max_bytes:
        raise InputError(f"IMAGE: {len(data)} bytes exceeds the {recipe.max_bytes} byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > recipe.max_pixels:
                raise InputError(
                    f"IMAGE: {width}x{height} = {width * height} pixels exceeds the {recipe.max_pixels} pixel limit"
                )
            image.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("IMAGE: not a decodable image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"IMAGE: rejected as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"IMAGE: not a decodable image ({exc})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white, as transformers' convert_to_rgb does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(height: int, width: int, recipe: ImageRecipe) -> tuple[int, int]:
    if recipe.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = recipe.shortest_edge, int(recipe.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if recipe.resize_height:
        return recipe.resize_height, recipe.resize_width
    return height, width


def preprocess_image(image: Image.Image, recipe: ImageRecipe) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W]."""
    height, width = image.height, image.width
    new_h, new_w = resized_size(height, width, recipe)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), resample=recipe.resample)
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    if recipe.crop_height:
        pixels = center_crop(pixels, recipe.crop_height, recipe.crop_width)
    out = pixels.astype(np.float32)
    if recipe.rescale_factor is not None:
        out = (pixels.astype(np.float64) * recipe.rescale_factor).astype(np.float32)
    if recipe.mean is not None:
        mean = np.asarray(recipe.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(recipe.std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)


def center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Floor-offset center crop of CHW pixels, zero-padding images smaller than the crop."""
    _, height, width = pixels.shape
    if height < crop_h or width < crop_w:
        padded_h, padded_w = max(height, crop_h), max(width, crop_w)
        canvas = np.zeros((pixels.shape[0], padded_h, padded_w), dtype=pixels.dtype)
        top, left = (padded_h - height) // 2, (padded_w - width) // 2
        canvas[:, top : top + height, left : left + width] = pixels
        pixels, height, width = canvas, padded_h, padded_w
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return pixels[:, top : top + crop_h, left : left + crop_w]


def image_bytes_to_pixels(data: bytes, recipe: ImageRecipe) -> np.ndarray:
    return preprocess_image(decode_image(data, recipe), recipe)
