"""Image decoding with safety bounds, RGB conversion, aspect handling and the vision tower's resize + normalise.

Every image goes bytes → bounded decode → RGB → `pad`/`crop`/`resize` → the geometry of the HF image processor
shipped with the vision tower's checkpoint (shortest-edge or exact resize with its PIL resample filter, then
centre crop) → ByteTensor[3, H, W]. Normalisation (rescale, mean, std) is a 256-entry table per channel read off
the processor itself (`pixel_table`), applied where the pixels are used: the vision tower normalises uint8 input
on its own device, so workers ship 4x fewer bytes and the CPU skips the float arithmetic. The resize is the one
the processor's PIL backend (and the official LLaVA stack, transformers 4.37) performs, so pixels equal that
backend's bit for bit; the torchvision backend's resize differs from PIL's by at most one 8-bit level on a few
pixels. Images already at the output size (the miniature world's) are not resampled at all, so their pixels
equal any backend's bit for bit. Failures raise `ImageDecodeError` with a reason key so the converter and the
datamodule can count them instead of crashing.
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

from llava_lit.image_tiling import TileLayout, resize_uint8

AspectMode = Literal["pad", "crop", "resize", "anyres"]
PixelOutput = Literal["uint8", "normalized"]
ResizeBackend = Literal["pil", "torch"]
RESIZE_BACKENDS: tuple[str, ...] = typing.get_args(ResizeBackend)
"""The accepted `ImageLoader.resize` values."""
PIXEL_OUTPUTS: tuple[str, ...] = typing.get_args(PixelOutput)
"""The accepted `ImageLoader.output` values."""
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


def _size_fields(size: Any) -> dict[str, int | None]:
    """A processor's `size` / `crop_size` (a dict or a transformers `SizeDict`) as a plain dict."""
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    if isinstance(size, dict):
        return {k: size.get(k) for k in keys}
    return {k: getattr(size, k, None) for k in keys}


@dataclass(frozen=True)
class ProcessorGeometry:
    """The resize and centre crop of a CLIP-style image processor, applied with PIL (`resize_and_crop`)."""

    shortest_edge: int | None
    """Resize so the shorter side has this length, the longer one `int(edge * long / short)` (transformers'
    rounding); None when the resize is to an exact `resize_hw`, or there is no resize."""
    resize_hw: tuple[int, int] | None
    """Exact (height, width) to resize to; None with `shortest_edge` or without a resize."""
    crop_hw: tuple[int, int] | None
    """Centre crop (height, width), zero-padded where the image is smaller; None for no crop."""
    resample: int
    """PIL resampling filter id (3 = bicubic for CLIP)."""

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step for an input of `height` x `width`."""
        if self.shortest_edge is not None:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return self.resize_hw if self.resize_hw is not None else (height, width)


def processor_geometry(image_processor: Any) -> ProcessorGeometry | None:
    """The resize + crop of `image_processor` when it is one `resize_and_crop` reproduces, else None.

    Reproduced: the CLIP-style processors (both transformers backends, any resample filter PIL has) with a
    shortest-edge or exact-size resize and an optional centre crop; anything with padding, a longest-edge
    bound or other steps falls back to calling the processor.
    """
    needed = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "do_normalize")
    if any(not hasattr(image_processor, a) for a in needed) or getattr(image_processor, "do_pad", None):
        return None
    if type(image_processor).__name__ not in (
        "CLIPImageProcessor",
        "CLIPImageProcessorPil",
        "CLIPImageProcessorFast",
    ):
        return None
    resample = image_processor.resample
    resample = int(getattr(resample, "value", resample)) if resample is not None else 2
    if resample not in (0, 1, 2, 3, 4, 5):
        return None
    shortest_edge = resize_hw = crop_hw = None
    if image_processor.do_resize:
        size = _size_fields(image_processor.size)
        if size["longest_edge"] or size["max_height"] or size["max_width"]:
            return None
        if size["shortest_edge"]:
            shortest_edge = int(size["shortest_edge"])
        elif size["height"] and size["width"]:
            resize_hw = (int(size["height"]), int(size["width"]))
        else:
            return None
    if image_processor.do_center_crop:
        crop = _size_fields(image_processor.crop_size)
        if not (crop["height"] and crop["width"]):
            return None
        crop_hw = (int(crop["height"]), int(crop["width"]))
    return ProcessorGeometry(shortest_edge, resize_hw, crop_hw, resample)


def resize_and_crop(image: Image.Image, geometry: ProcessorGeometry, backend: str = "pil") -> torch.Tensor:
    """An RGB image resized and centre-cropped as `geometry` says: ByteTensor[3, H, W].

    `backend="pil"` resizes with PIL, the processor's filter and output size (what its PIL backend does, bit for
    bit); `"torch"` uses torch's uint8 antialiased kernel (bilinear/bicubic filters only, about 3x faster, within
    a couple of 8-bit levels of PIL on under 1 % of the pixels). An image already at the output size is left as
    it is. The crop takes rows/columns from `(size - crop) // 2` and pads with
    zeros where the image is smaller, as transformers' `center_crop` does.
    """
    new_h, new_w = geometry.resized_size(image.height, image.width)
    pixels = resize_uint8(image, new_h, new_w, resample=geometry.resample, backend=backend)  # [3, H', W']
    if geometry.crop_hw is None:
        return pixels
    crop_h, crop_w = geometry.crop_hw
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + crop_h, left : left + crop_w]
    # Smaller than the crop: centre it on a zero canvas first (transformers rounds the padding up).
    canvas_h, canvas_w = max(crop_h, new_h), max(crop_w, new_w)
    pad_top, pad_left = -(-(canvas_h - new_h) // 2), -(-(canvas_w - new_w) // 2)
    canvas = torch.zeros((3, canvas_h, canvas_w), dtype=torch.uint8)
    canvas[:, pad_top : pad_top + new_h, pad_left : pad_left + new_w] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[:, max(0, top) : top + crop_h, max(0, left) : left + crop_w]


def pixel_table(image_processor: Any) -> torch.Tensor:
    """FloatTensor[3, 256]: the processor's rescale + normalise of every 8-bit value, per channel.

    Read off the processor itself (it processes a 1x256 ramp with resizing and cropping turned off), so a
    table lookup gives its float output bit for bit, whatever backend and arithmetic it uses.
    """
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]
    out = image_processor(
        images=Image.fromarray(ramp), do_resize=False, do_center_crop=False, return_tensors="pt"
    )["pixel_values"]  # [1, 3, 1, 256]
    if tuple(out.shape) != (1, 3, 1, 256):
        raise ValueError(
            f"{type(image_processor).__name__} does not map pixels one to one: {tuple(out.shape)}"
        )
    return out[0, :, 0, :].to(torch.float32).contiguous()


def normalize_pixels(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> float32 normalised pixels of the same shape, via `pixel_table` values."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels takes uint8 pixels, got {pixels.dtype}")
    if pixels.ndim < 3 or pixels.shape[-3] != table.shape[0]:
        raise ValueError(f"pixels must be [..., {table.shape[0]}, H, W], got shape {tuple(pixels.shape)}")
    table = table.to(pixels.device)
    channel = torch.arange(table.shape[0], device=pixels.device).view(-1, 1, 1)  # [3, 1, 1]
    return table[channel, pixels.long()]  # [..., 3, H, W] float32


@dataclass(frozen=True)
class TiledImage:
    """An image as an AnyRes model reads it: its whole view and tiles, and the size its token count follows from."""

    pixels: torch.Tensor
    """[1 + tiles, 3, H, W], uint8 or float32 (see `ImageLoader.output`), whole view first."""
    size: tuple[int, int]
    """(height, width) of the decoded image."""


@dataclass
class ImageLoader:
    """Bytes → pixels [3, H, W] for one vision tower: bounded decode, aspect handling, its processor's geometry.

    With `output="uint8"` (the default) the result is the resized, cropped ByteTensor that the vision tower
    normalises itself; `"normalized"` returns the processor's float output (the same values the tower computes).
    A processor whose steps `processor_geometry` does not know is called as it is, giving floats either way.
    """

    image_processor: Any
    """The image processor shipped with the vision tower's checkpoint (e.g. `CLIPImageProcessor`)."""
    aspect: AspectMode = "pad"
    """`pad`: pad to square with the processor mean (LLaVA-1.5, nothing cropped); `crop`: shortest-edge resize +
    centre crop (CLIP default); `resize`: stretch to the output size; `anyres`: LLaVA-NeXT tiling, the whole view
    and the tiles of `tile_layout` (`[1 + tiles, 3, H, W]` per image)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels than this are rejected before decoding."""
    output: PixelOutput = "uint8"
    """`uint8`: ByteTensor pixels, normalised later by the vision tower on its device (4x fewer bytes from the
    workers); `normalized`: FloatTensor pixels as the processor returns them."""
    resize: ResizeBackend = "pil"
    """`pil`: the processor's PIL resize, bit for bit (and the official LLaVA pixels); `torch`: torch's uint8
    antialiased resize, about 3x faster, within a couple of 8-bit levels of PIL on under 1 % of the pixels. Both
    apply to AnyRes tiles and whole views alike."""
    tile_layout: TileLayout | None = None
    """The AnyRes tiling (from the model, `LlavaModel.tile_layout`); needed with `aspect="anyres"` only."""

    def __post_init__(self) -> None:
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"image aspect must be one of {list(ASPECT_MODES)}, got {self.aspect!r}")
        if (self.aspect == "anyres") != (self.tile_layout is not None):
            raise ValueError(
                "image aspect 'anyres' goes with an AnyRes model (model.anyres set) and the other aspects with a "
                f"one-view model; got aspect {self.aspect!r} with "
                f"{'an AnyRes' if self.tile_layout is not None else 'a one-view'} model"
            )
        if self.resize not in RESIZE_BACKENDS:
            raise ValueError(f"image resize must be pil or torch, got {self.resize!r}")
        if self.output not in PIXEL_OUTPUTS:
            raise ValueError(f"image output must be uint8 or normalized, got {self.output!r}")
        self._fill = mean_fill_color(self.image_processor)
        self._size = processor_output_size(self.image_processor)
        self._geometry = processor_geometry(self.image_processor)
        self._table = pixel_table(self.image_processor) if self._geometry is not None else None
        if self.tile_layout is not None:
            if self._geometry is None or self._table is None:
                raise ValueError(
                    f"AnyRes tiling needs a CLIP-style processor, not {type(self.image_processor).__name__}"
                )
            if self._size != (self.tile_layout.base, self.tile_layout.base):
                raise ValueError(
                    f"AnyRes tiles of {self.tile_layout.base} px for a tower that reads {self._size}"
                )

    def prepare(self, image: Image.Image) -> Image.Image:
        """Apply the aspect mode to an RGB image (the processor then resizes/crops a square or exact-size image)."""
        if self.aspect == "pad":
            return expand_to_square(image, self._fill)
        if self.aspect == "resize":
            height, width = self._size
            return image.resize((width, height), Image.Resampling.BICUBIC)
        return image

    def decode(self, data: bytes) -> Image.Image:
        """Image bytes -> RGB image, bounded by `max_pixels` (see `decode_image`)."""
        return decode_image(data, max_pixels=self.max_pixels)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one decoded RGB image: [3, H, W] (AnyRes: [1 + tiles, 3, H, W]), uint8 or float32 (see
        `output`)."""
        if self.tile_layout is not None:
            # [1 + tiles, 3, H, W] uint8, resized with this loader's backend
            tiles = self.tile_layout.tiles(image, self._geometry.resample, self.resize)
            return tiles if self.output == "uint8" else normalize_pixels(tiles, self._table)
        image = self.prepare(image)
        if self._geometry is not None and self._table is not None:
            pixels = resize_and_crop(image, self._geometry, self.resize)  # [3, H, W] uint8
            return pixels if self.output == "uint8" else normalize_pixels(pixels, self._table)
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return pixel_values[0]  # [1, 3, H, W] -> [3, H, W]

    def __call__(self, data: bytes) -> torch.Tensor | TiledImage:
        """Decode and preprocess one image: [3, H, W], uint8 or float32; with AnyRes a `TiledImage`."""
        image = self.decode(data)
        if self.tile_layout is not None:
            return TiledImage(self.pixels(image), (image.height, image.width))
        return self.pixels(image)
