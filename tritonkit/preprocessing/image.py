"""Image bytes -> normalized CHW float32, matching a transformers image processor.

The recipe is read from the model's own image processor, so the served pipeline computes what
`CLIPImageProcessor` computes: decode, resize of the shortest edge with the processor's filter
(transformers' integer truncation of the long edge), a center crop at floor offsets, rescale,
normalize. Two engines run a recipe: DALI (`tritonkit.preprocessing.dali`, the default, and the
only one on GPU) and PIL here, which equals `CLIPImageProcessor` exactly (RGBA composited onto
white, as transformers does).

Deployment options beside the processor's settings: size limits (bytes, pixels), accepted
formats, resize mode (`crop` as CLIP, `fit` = stretch to the output size, `pad` = letterbox
with the mean colour) and EXIF orientation (applied by default; transformers ignores it).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tritonkit.errors import InputError

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
# The image after its resize and before the crop: resizing the short edge of a 1x20000 strip to
# 224 would make 224x4480000 pixels (3 GB). 16M pixels allows up to ~300:1 at 224.
DEFAULT_MAX_RESIZE_PIXELS = 16_000_000
RESIZE_MODES = ("crop", "fit", "pad")
# What each engine decodes; names are lower-case PIL format names ("mpo" is a phone's JPEG).
PIL_FORMATS = ("jpeg", "png", "webp", "gif", "bmp", "tiff")
DALI_FORMATS = ("jpeg", "png", "webp", "bmp", "tiff")
_FORMAT_ALIASES = {"mpo": "jpeg", "jpg": "jpeg", "tif": "tiff"}


@dataclass(frozen=True)
class ImageRecipe:
    shortest_edge: int | None  # resize the shortest edge to this, keeping aspect ratio
    resize_height: int | None  # or resize to exactly this size (SigLIP-style processors)
    resize_width: int | None
    crop_height: int | None  # center crop, when set
    crop_width: int | None
    resample: int  # PIL resampling filter
    rescale_factor: float | None
    mean: tuple[float, ...] | None  # one per channel (RGB)
    std: tuple[float, ...] | None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_resize_pixels: int = DEFAULT_MAX_RESIZE_PIXELS
    resize_mode: str = "crop"
    formats: tuple[str, ...] = DALI_FORMATS
    exif_orientation: bool = True
    # PIL path: decode a JPEG much larger than the resize at a reduced DCT scale (libjpeg's 1/2,
    # 1/4, 1/8) that keeps it at least JPEG_DRAFT_MARGIN times the resize. Off by default:
    # scripts/bench_jpeg_draft.py measures its pixel and embedding differences against the family's
    # tolerance (docs/BENCHMARKS.md)
    jpeg_draft: bool = False

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"resize mode {self.resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
        formats = tuple(_FORMAT_ALIASES.get(f.lower(), f.lower()) for f in self.formats)
        unknown = sorted(set(formats) - set(PIL_FORMATS))
        if unknown or not formats:
            raise InputError(f"image formats {unknown or '[]'}: choose from {', '.join(PIL_FORMATS)}")
        if self.max_bytes < 1 or self.max_pixels < 1 or self.max_resize_pixels < 1:
            raise InputError("image size limits must be >= 1")
        object.__setattr__(self, "formats", formats)

    def with_options(self, **options) -> ImageRecipe:
        """A copy with deployment options replaced; None keeps the current value."""
        import dataclasses

        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})

    def pixel_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std on the 0-255 pixel scale: (pixel - mean) / std is rescale + normalize."""
        scale = self.rescale_factor if self.rescale_factor is not None else 1.0
        mean = self.mean if self.mean is not None else (0.0, 0.0, 0.0)
        std = self.std if self.std is not None else (1.0, 1.0, 1.0)
        return tuple(m / scale for m in mean), tuple(s / scale for s in std)

    def mean_pixel(self) -> tuple[float, ...]:
        """The colour that normalizes to zero: what `pad` letterboxes with."""
        return self.pixel_mean_std()[0]

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.crop_height and self.crop_width:
            return self.crop_height, self.crop_width
        if self.resize_height and self.resize_width:
            return self.resize_height, self.resize_width
        raise ValueError("recipe without crop or fixed resize has no fixed output size")

    @classmethod
    def from_processor(cls, processor) -> ImageRecipe:
        """Read the settings of a transformers image processor (CLIPImageProcessor and kin)."""
        size = dict(processor.size or {}) if getattr(processor, "do_resize", True) else {}
        crop = dict(processor.crop_size or {}) if getattr(processor, "do_center_crop", False) else {}
        resample = processor.resample if processor.resample is not None else Image.Resampling.BICUBIC
        return cls(
            shortest_edge=size.get("shortest_edge"),
            resize_height=size.get("height"),
            resize_width=size.get("width"),
            crop_height=crop.get("height"),
            crop_width=crop.get("width"),
            resize_mode="crop" if crop else "fit",
            resample=int(resample),
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else None,
            mean=tuple(float(m) for m in processor.image_mean) if processor.do_normalize else None,
            std=tuple(float(s) for s in processor.image_std) if processor.do_normalize else None,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageRecipe:
        data = json.loads(text)
        for key in ("mean", "std", "formats"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def inspect_image(data: bytes, recipe: ImageRecipe) -> Image.Image:
    """Check the size limits and the format from the header alone (nothing is decoded yet)."""
    if len(data) == 0:
        raise InputError("IMAGE: empty input (0 bytes)", reason="empty")
    if len(data) > recipe.max_bytes:
        raise InputError(f"IMAGE: {len(data)} bytes exceeds the {recipe.max_bytes} byte limit", reason="too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError("IMAGE: not a decodable image (unknown format)", reason="undecodable") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"IMAGE: rejected as a decompression bomb ({exc})", reason="decompression_bomb") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"IMAGE: not a decodable image ({exc})", reason="undecodable") from None
    fmt = _FORMAT_ALIASES.get((image.format or "").lower(), (image.format or "").lower())
    if fmt not in recipe.formats:
        raise InputError(
            f"IMAGE: {fmt or 'unknown'} images are not accepted (accepted: {', '.join(recipe.formats)})",
            reason="unsupported_format",
        )
    width, height = image.size
    if width * height > recipe.max_pixels:
        raise InputError(
            f"IMAGE: {width}x{height} = {width * height} pixels exceeds the {recipe.max_pixels} pixel limit",
            reason="too_large",
        )
    resized_h, resized_w = resized_size(height, width, recipe)
    if resized_h * resized_w > recipe.max_resize_pixels:
        raise InputError(
            f"IMAGE: {width}x{height} is too elongated: its resize to {resized_w}x{resized_h} exceeds the "
            f"{recipe.max_resize_pixels} pixel limit (max_resize_pixels); crop it closer to square",
            reason="too_large",
        )
    return image


JPEG_DRAFT_MARGIN = 2  # the scaled decode stays >= 2x the resize, so the resize filter still antialiases


def draft(image: Image.Image, recipe: ImageRecipe) -> None:
    """Ask libjpeg for the smallest DCT scale whose result still covers JPEG_DRAFT_MARGIN x the
    resize in both dims (whatever the EXIF orientation turns them into)."""
    height, width = image.height, image.width
    new_h, new_w = resized_size(height, width, recipe)
    side = JPEG_DRAFT_MARGIN * max(new_h, new_w)
    image.draft(image.mode, (side, side))


def decode_image(data: bytes, recipe: ImageRecipe) -> Image.Image:
    """Decode encoded image bytes to RGB; every failure is an InputError naming the cause."""
    image = inspect_image(data, recipe)
    if recipe.jpeg_draft and image.format == "JPEG":
        draft(image, recipe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            if recipe.exif_orientation:
                image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"IMAGE: rejected as a decompression bomb ({exc})", reason="decompression_bomb") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"IMAGE: not a decodable image ({exc})", reason="undecodable") from None
    return to_rgb(image)


EXIF_ORIENTATION_TAG = 0x0112
EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


def oriented_size(image: Image.Image, exif_orientation: bool = True) -> tuple[int, int]:
    """(height, width) once the EXIF orientation is applied, from the header alone."""
    width, height = image.size
    if exif_orientation and image.getexif().get(EXIF_ORIENTATION_TAG) in EXIF_TRANSPOSED:
        return width, height
    return height, width


def has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def checked_image_bytes(data: bytes, recipe: ImageRecipe) -> bytes:
    """The bytes to hand a DALI decoder, after the header checks that DALI cannot do per request.

    DALI's decoder drops alpha where transformers composites onto white, so the (rare) images
    with transparency are flattened here and passed on as lossless PNG."""
    image = inspect_image(data, recipe)
    if not has_transparency(image):
        return data
    buffer = io.BytesIO()
    decode_image(data, recipe).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white, as transformers' convert_to_rgb does."""
    if has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(height: int, width: int, recipe: ImageRecipe) -> tuple[int, int]:
    if recipe.resize_mode == "crop" and recipe.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = recipe.shortest_edge, int(recipe.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    out_h, out_w = recipe.output_hw
    if recipe.resize_mode == "pad":
        if height * out_w >= width * out_h:
            return out_h, (out_h * width) // height
        return (out_w * height) // width, out_w
    return out_h, out_w


def preprocess_image(image: Image.Image, recipe: ImageRecipe) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W]."""
    height, width = image.height, image.width
    new_h, new_w = resized_size(height, width, recipe)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), resample=recipe.resample)
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    out_h, out_w = recipe.output_hw
    if recipe.resize_mode == "pad":
        pixels = center_crop(pixels, out_h, out_w, fill=recipe.mean_pixel())
    elif recipe.crop_height:
        pixels = center_crop(pixels, out_h, out_w)
    out = pixels.astype(np.float32)
    if recipe.rescale_factor is not None:
        out = (pixels.astype(np.float64) * recipe.rescale_factor).astype(np.float32)
    if recipe.mean is not None:
        mean = np.asarray(recipe.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(recipe.std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)


def center_crop(pixels: np.ndarray, crop_h: int, crop_w: int, fill: tuple[float, ...] = (0, 0, 0)) -> np.ndarray:
    """Floor-offset center crop of CHW pixels, padding images smaller than the crop with `fill`."""
    _, height, width = pixels.shape
    if height < crop_h or width < crop_w:
        padded_h, padded_w = max(height, crop_h), max(width, crop_w)
        canvas = np.empty((pixels.shape[0], padded_h, padded_w), dtype=pixels.dtype)
        canvas[:] = np.asarray(fill).astype(pixels.dtype)[:, None, None]  # truncated, as DALI fills
        top, left = (padded_h - height) // 2, (padded_w - width) // 2
        canvas[:, top : top + height, left : left + width] = pixels
        pixels, height, width = canvas, padded_h, padded_w
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return pixels[:, top : top + crop_h, left : left + crop_w]


def image_bytes_to_pixels(data: bytes, recipe: ImageRecipe) -> np.ndarray:
    return preprocess_image(decode_image(data, recipe), recipe)
