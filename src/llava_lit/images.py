"""Image decoding with safety bounds, RGB conversion and aspect handling, ending in the vision tower's processor.

Every image goes bytes → bounded decode → RGB → `pad`/`crop`/`resize` → the HF image processor shipped with
the vision tower's checkpoint → FloatTensor[3, H, W]. Failures raise `ImageDecodeError` with a reason key so
the converter and the datamodule can count them instead of crashing.
"""

from __future__ import annotations

import io
import re
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

AspectMode = Literal["pad", "crop", "resize"]
ASPECT_MODES: tuple[str, ...] = typing.get_args(AspectMode)
"""The accepted `image_aspect` values."""

DEFAULT_MAX_PIXELS = 64_000_000
"""Default bound on width × height before decoding (a 8000×8000 photo passes; decompression bombs do not)."""

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
"""File extensions treated as images (shard member keys use the lower-case form)."""

IMAGE_SKIP_REASONS = ("image_missing", "image_empty", "image_undecodable", "image_too_large")
"""Every reason an image can be rejected for (stable keys for counters and logs)."""


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is one of `IMAGE_SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image, refusing more than `max_pixels` pixels before decoding them.

    Handles EXIF rotation, grayscale, palette, CMYK, 16-bit and alpha (composited on white) inputs.
    """
    if not data:
        raise ImageDecodeError("image_empty")
    try:
        with warnings.catch_warnings():
            # Our own bound below replaces PIL's DecompressionBombWarning; PIL's error above 2x its limit stays.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError("image_too_large", f"{width}x{height} > {max_pixels} pixels")
            image.load()
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("image_too_large", str(err)) from err
    except ImageDecodeError:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError) for broken files
        # Drop the BytesIO's address from PIL's message: skip reports must be the same on every run.
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(err))
        raise ImageDecodeError("image_undecodable", f"{type(err).__name__}: {message}") from err
    if width == 0 or height == 0:
        raise ImageDecodeError("image_undecodable", "zero-sized image")
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16/32-bit integer images are rescaled from their full range."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # PIL's convert() clips these at 255 instead of rescaling: scale the 16-bit range to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        array = np.clip(array / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low or 1.0) * 255.0
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a square canvas of colour `fill`, image centred (LLaVA-1.5's `expand2square`); nothing is cut."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def processor_output_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) of the processor's output tensors (its crop size, else its resize size)."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                return int(size["height"]), int(size["width"])
            if "shortest_edge" in size:
                return int(size["shortest_edge"]), int(size["shortest_edge"])
        elif size is not None and hasattr(size, "height") and size.height:
            return int(size.height), int(size.width)
    raise ValueError(f"cannot tell the output size of {type(image_processor).__name__}")


def mean_fill_color(image_processor: Any) -> tuple[int, int, int]:
    """The processor's normalisation mean as an 8-bit colour, truncated as LLaVA does ((122, 116, 104) for CLIP)."""
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


@dataclass
class ImageLoader:
    """Bytes → FloatTensor[3, H, W] for one vision tower: bounded decode, aspect handling, its HF processor."""

    image_processor: Any
    """The image processor shipped with the vision tower's checkpoint (e.g. `CLIPImageProcessor`)."""
    aspect: AspectMode = "pad"
    """`pad`: pad to square with the processor mean (LLaVA-1.5, nothing cropped); `crop`: shortest-edge resize +
    centre crop (CLIP default); `resize`: stretch to the output size."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels than this are rejected before decoding."""

    def __post_init__(self) -> None:
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"image aspect must be pad, crop or resize, got {self.aspect!r}")
        self._fill = mean_fill_color(self.image_processor)
        self._size = processor_output_size(self.image_processor)

    def prepare(self, image: Image.Image) -> Image.Image:
        """Apply the aspect mode to an RGB image (the processor then resizes/crops a square or exact-size image)."""
        if self.aspect == "pad":
            return expand_to_square(image, self._fill)
        if self.aspect == "resize":
            height, width = self._size
            return image.resize((width, height), Image.Resampling.BICUBIC)
        return image

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode and preprocess one image: FloatTensor[3, H, W]."""
        image = self.prepare(decode_image(data, max_pixels=self.max_pixels))
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return pixel_values[0]  # [1, 3, H, W] -> [3, H, W]
