"""AnyRes tiling (LLaVA-NeXT): an image seen as a grid of base-size tiles at its own aspect ratio, plus a whole view.

An image of `height` x `width` is resized, aspect kept, into the best-fitting resolution among the
`grid_pinpoints` (the one that keeps the most of the image's pixels, then the one that wastes the least canvas),
centred on a black canvas of that resolution, and cut row by row into `base` x `base` tiles. A downscaled view
of the whole image (stretched to `base` x `base`) goes first. The tower encodes every tile; the model lays the
tile features out as one feature map, removes the rows or columns that only saw the padding ("unpad") and ends
each row with a learned newline embedding (`model.anyres`).

Everything here depends on the image size alone, so the data pipeline knows each image's token count (and so
its masks and its place in a packed row) before any pixel reaches the tower. The arithmetic is transformers'
(`LlavaNextImageProcessor`, `LlavaNextProcessor._get_number_of_features`, `unpad_image`), which the tests
compare against on images of many aspect ratios.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)
"""LLaVA-NeXT's `image_grid_pinpoints` for a 336-pixel tower, as (height, width): 1x2, 2x1, 2x2, 3x1 and 1x3 tiles."""


@dataclass
class AnyResSettings:
    """How an AnyRes model tiles images and lays out their features (`model.anyres`)."""

    grid_pinpoints: list[list[int]] = field(default_factory=lambda: [list(p) for p in LLAVA_NEXT_PINPOINTS])
    """Candidate resolutions as [height, width], each a multiple of the tower's input size in both sides
    (LLaVA-NeXT: 336x672, 672x336, 672x672, 1008x336, 336x1008)."""
    unpad: bool = True
    """Drop the feature rows / columns that only cover the padding of the resize (LLaVA-NeXT's `spatial_unpad`)."""
    newline: bool = True
    """End each row of the tile feature map with a learned `image_newline` embedding (LLaVA-NeXT)."""

    def check(self, base: int) -> None:
        """Raise `ValueError` unless every pinpoint is a positive multiple of `base` (the tower's input side)."""
        if not self.grid_pinpoints:
            raise ValueError("anyres.grid_pinpoints is empty")
        for point in self.grid_pinpoints:
            if len(point) != 2 or any(int(v) <= 0 or int(v) % base for v in point):
                raise ValueError(
                    f"anyres.grid_pinpoints entry {list(point)} is not [height, width], each a positive multiple "
                    f"of the tower's input size {base}"
                )


@dataclass(frozen=True)
class TileLayout:
    """AnyRes settings bound to one vision tower: what the data pipeline and the model both compute from."""

    settings: AnyResSettings
    """The tiling and feature-layout settings."""
    base: int
    """The tower's input side in pixels (336 for CLIP-L/14-336): the tile size."""
    feature_grid: int
    """Feature rows (= columns) the tower gives per tile (24 for CLIP-L/14-336)."""

    def __post_init__(self) -> None:
        self.settings.check(self.base)

    @property
    def pinpoints(self) -> list[tuple[int, int]]:
        """The candidate resolutions as (height, width) tuples."""
        return [(int(h), int(w)) for h, w in self.settings.grid_pinpoints]

    def resolution(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) canvas an image of this size is fitted into."""
        return select_best_resolution(height, width, self.pinpoints)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles for an image of this size."""
        canvas_h, canvas_w = self.resolution(height, width)
        return canvas_h // self.base, canvas_w // self.base

    def num_tiles(self, height: int, width: int) -> int:
        """Images the tower encodes for this image: its tiles plus the whole view."""
        rows, cols = self.grid(height, width)
        return rows * cols + 1

    def feature_map_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the tile feature map after unpadding (before the newline column)."""
        rows, cols = self.grid(height, width)
        map_h, map_w = rows * self.feature_grid, cols * self.feature_grid
        if not self.settings.unpad:
            return map_h, map_w
        return unpadded_size(height, width, map_h, map_w)

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens this image becomes: the whole view's, the feature map's and one newline per map row."""
        map_h, map_w = self.feature_map_size(height, width)
        newlines = map_h if self.settings.newline else 0
        return self.feature_grid**2 + map_h * map_w + newlines

    def tiles(self, image: Image.Image, resample: int, backend: str = "pil") -> torch.Tensor:
        """The tower's input for one RGB image: ByteTensor[1 + rows * cols, 3, base, base], whole view first.

        `resample` is the PIL filter of the tower's processor (bicubic for CLIP) and `backend` the resize that
        applies it (`resize_uint8`); with `pil` the pixels equal transformers' `LlavaNextImageProcessor` (PIL
        backend) before its rescale and normalise.
        """
        width, height = image.size
        canvas_h, canvas_w = self.resolution(height, width)
        new_h, new_w = fitted_size(height, width, canvas_h, canvas_w)
        canvas = torch.zeros((3, canvas_h, canvas_w), dtype=torch.uint8)  # black padding, as LLaVA-NeXT
        top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2
        fitted = resize_uint8(image, new_h, new_w, resample=resample, backend=backend)  # [3, h, w]
        canvas[:, top : top + new_h, left : left + new_w] = fitted
        rows, cols = canvas_h // self.base, canvas_w // self.base
        grid = canvas.view(3, rows, self.base, cols, self.base)  # [3, r, b, c, b]
        tiles = grid.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, self.base, self.base)  # row-major tiles
        whole = resize_uint8(image, self.base, self.base, resample=resample, backend=backend)  # [3, b, b]
        return torch.cat([whole[None], tiles], dim=0).contiguous()  # [1 + r*c, 3, b, b] uint8


TORCH_RESIZE_MODES = {2: "bilinear", 3: "bicubic"}
"""PIL resample ids torch's antialiased uint8 resize has a counterpart for."""


def resize_uint8(
    image: Image.Image, height: int, width: int, *, resample: int, backend: str = "pil"
) -> torch.Tensor:
    """An RGB image resized to (height, width) with PIL's filter `resample`: ByteTensor[3, height, width].

    `backend="pil"` is the image processors' own resize, bit for bit; `"torch"` uses torch's uint8 antialiased
    kernel for the filters it has (`TORCH_RESIZE_MODES`) and PIL for the others. An image already at that size
    is returned as it is.
    """
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W] uint8, channels-last
    if (height, width) == (image.height, image.width):
        return pixels
    if backend == "torch" and resample in TORCH_RESIZE_MODES:
        mode = TORCH_RESIZE_MODES[resample]
        return F.interpolate(pixels[None], size=(height, width), mode=mode, antialias=True)[0]
    resized = image.resize((width, height), resample=resample)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def select_best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) among `pinpoints` that keeps the most of the image's pixels once fitted inside,
    ties going to the one with the least unused canvas (LLaVA-NeXT's `select_best_resolution`)."""
    best: tuple[int, int] | None = None
    best_effective, best_waste = 0, math.inf
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        fitted_w, fitted_h = int(width * scale), int(height * scale)
        effective = min(fitted_w * fitted_h, width * height)
        waste = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (canvas_h, canvas_w), effective, waste
    if best is None:
        raise ValueError(f"no grid pinpoint fits an image of {height}x{width}")
    return best


def fitted_size(height: int, width: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
    """(height, width) of the image resized, aspect kept, to fit a `canvas_h` x `canvas_w` canvas exactly on one
    side (the other side rounded up, as transformers' `get_patch_output_size`)."""
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def unpadded_size(height: int, width: int, map_h: int, map_w: int) -> tuple[int, int]:
    """(rows, columns) of a `map_h` x `map_w` feature map of a padded image of `height` x `width` once the rows
    or columns of the padding are cut, equally from both ends (LLaVA-NeXT's `unpad_image`)."""
    if width / height > map_w / map_h:
        kept = int(round(height * (map_w / width), 7))
        return map_h - 2 * ((map_h - kept) // 2), map_w
    kept = int(round(width * (map_h / height), 7))
    return map_h, map_w - 2 * ((map_w - kept) // 2)
