"""LLaVA-NeXT (AnyRes) in the terms of transformers and of the official LLaVA-1.6 code, both ways.

An AnyRes `LlavaModel` (`model.anyres` set) is transformers' `LlavaNextForConditionalGeneration`: the same tower,
projector and LLM weights as LLaVA-1.5 (`model.hf_interop.to_hf_llava_state_dict`) plus the learned row-end vector,
ours `projector.image_newline`, theirs `model.image_newline` (`image_newline` in the older hub layout, official
`model.image_newline`). transformers and the official `spatial_unpad` merge always unpad and always end rows with
the newline, so only `AnyResSettings(unpad=True, newline=True)` maps onto them.

Grid pinpoints are [height, width] here and in transformers, [width, height] in the official code (its
`select_best_resolution` reads `for width, height in possible_resolutions`); the official import swaps them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlavaNextConfig, LlavaNextImageProcessor

from llava_lit.image_tiling import AnyResSettings, TileLayout
from llava_lit.model.hf_interop import to_hf_llava_state_dict
from llava_lit.model.llava import LlavaModel
from llava_lit.untrusted import dataclass_from_data

NEWLINE_KEY = "projector.image_newline"
"""Our key of the learned AnyRes row-end vector ([D])."""

HF_NEWLINE_KEYS = ("model.image_newline", "image_newline")
"""transformers' keys of it: the current layout (>= 4.52) and the older one most llava-hf repositories hold."""

OFFICIAL_NEWLINE_KEY = "model.image_newline"
"""The official LLaVA-1.6 key of it."""

OFFICIAL_ANYRES_MERGE = "spatial_unpad"
"""The official `mm_patch_merge_type` llava_lit reproduces (unpad, then a newline per row)."""


def check_transformers_representable(settings: AnyResSettings) -> None:
    """Raise `ValueError` unless transformers' LLaVA-NeXT computes what `settings` describe (unpad and newline)."""
    off = [name for name in ("unpad", "newline") if not getattr(settings, name)]
    if off:
        raise ValueError(
            f"anyres.{' and anyres.'.join(off)} off: transformers' LLaVA-NeXT always unpads the tile feature map and "
            "ends each row with image_newline (the official 'spatial_unpad'), so this model has no transformers "
            "equivalent"
        )


def to_hf_llava_next_state_dict(model: LlavaModel) -> tuple[LlavaNextConfig, dict[str, torch.Tensor]]:
    """The `LlavaNextConfig` and state dict that load into `LlavaNextForConditionalGeneration` with our outputs.

    The tower, projector and LLM map as for LLaVA-1.5 (`to_hf_llava_state_dict`, which refuses what transformers
    cannot hold); `projector.image_newline` becomes `model.image_newline`.
    """
    layout = model.tile_layout
    if layout is None:
        raise ValueError("not an AnyRes model (model.anyres is None): export it as transformers' LLaVA")
    check_transformers_representable(layout.settings)
    llava, state = to_hf_llava_state_dict(model)
    if llava.vision_feature_select_strategy != "default":
        raise ValueError(
            "transformers' LLaVA-NeXT lays out patch features only (vision_feature_select=patch)"
        )
    if llava.vision_config.image_size != layout.base:
        raise ValueError(
            f"transformers' LLaVA-NeXT cuts tiles of the tower's image_size {llava.vision_config.image_size} px, "
            f"but this model's tiles are {layout.base} px (its image processor's crop size)"
        )
    config = LlavaNextConfig(
        vision_config=llava.vision_config.to_dict(),
        text_config=llava.text_config.to_dict(),
        image_token_index=llava.image_token_index,
        image_seq_length=llava.image_seq_length,
        projector_hidden_act=llava.projector_hidden_act,
        vision_feature_select_strategy="default",
        vision_feature_layer=llava.vision_feature_layer,
        multimodal_projector_bias=llava.multimodal_projector_bias,
        tie_word_embeddings=llava.tie_word_embeddings,
        image_grid_pinpoints=[list(point) for point in layout.pinpoints],
    )
    state[HF_NEWLINE_KEYS[0]] = model.projector.image_newline.detach()  # [D]
    return config, state


def hf_llava_next_image_processor(clip_processor: Any, layout: TileLayout) -> LlavaNextImageProcessor:
    """A `LlavaNextImageProcessor` computing our tiles: the tower's CLIP rescale, mean, std and filter, tiles of
    `layout.base` pixels (no further resize or crop of a tile) and the whole view stretched to `base` x `base`."""
    base = layout.base
    return LlavaNextImageProcessor(
        size={"shortest_edge": base},
        crop_size={"height": base, "width": base},
        image_grid_pinpoints=[list(point) for point in layout.pinpoints],
        resample=clip_processor.resample,
        image_mean=list(clip_processor.image_mean),
        image_std=list(clip_processor.image_std),
        do_rescale=bool(clip_processor.do_rescale),
        rescale_factor=clip_processor.rescale_factor,
        do_normalize=bool(clip_processor.do_normalize),
        do_center_crop=True,
        do_convert_rgb=True,
        do_pad=True,  # pads the batch to its largest tile count; the model drops the padding by image_sizes
    )


def checked_anyres(grid_pinpoints: Any, where: str) -> AnyResSettings:
    """The `model.anyres` settings of a transformers / official LLaVA-NeXT checkpoint: its pinpoints ([height,
    width], read from a file, so type-checked as data: `ConfigRefused` naming `where` unless `list[list[int]]`),
    unpad and newline on."""
    node = {"grid_pinpoints": grid_pinpoints, "unpad": True, "newline": True}
    return dataclass_from_data(AnyResSettings, node, where)


def check_hf_tile_size(image_processor: Any, folder: Path) -> None:
    """Raise unless a llava-hf `LlavaNextImageProcessor` cuts tiles of its crop size and stretches the whole view
    to the same size (what our `TileLayout` does): `size.shortest_edge` (or height x width) equals the crop."""
    size, crop = dict(image_processor.size), dict(image_processor.crop_size or {})
    side = size.get("shortest_edge") or size.get("height")
    if (
        not crop
        or crop.get("height") != crop.get("width")
        or side != crop["height"]
        or ("width" in size and size["width"] != side)
    ):
        raise ValueError(
            f"{folder}: the LLaVA-NeXT image processor resizes to {size} and crops to {crop}; llava_lit's AnyRes "
            "tiles need one square tile size for both"
        )


def official_anyres(config: dict[str, Any], folder: Path) -> AnyResSettings | None:
    """`model.anyres` for an official config.json: None for one view per image (`image_aspect_ratio` not
    `anyres` and `mm_patch_merge_type: flat`), the LLaVA-1.6 settings for `anyres` + `spatial_unpad`; every other
    combination raises `ValueError` naming the field."""
    aspect = config.get("image_aspect_ratio", "square")
    merge = config.get("mm_patch_merge_type", "flat")
    if isinstance(aspect, str) and aspect.startswith("anyres_max"):
        raise ValueError(
            f"{folder}: image_aspect_ratio={aspect!r} (LLaVA-OneVision's tile budget with feature pooling) is not "
            "supported; llava_lit reproduces LLaVA-1.6's 'anyres' with 'spatial_unpad'"
        )
    if aspect != "anyres":
        if merge != "flat":
            raise ValueError(
                f"{folder}: mm_patch_merge_type={merge!r} with image_aspect_ratio={aspect!r} is not supported; "
                "llava_lit imports 'flat' for one view per image and 'spatial_unpad' with 'anyres' tiles"
            )
        return None
    if merge != OFFICIAL_ANYRES_MERGE:
        raise ValueError(
            f"{folder}: image_aspect_ratio='anyres' with mm_patch_merge_type={merge!r} is not supported; "
            f"llava_lit reproduces {OFFICIAL_ANYRES_MERGE!r} only (unpadded tile features, a newline per row), "
            "as transformers' LLaVA-NeXT does"
        )
    points = config.get("image_grid_pinpoints")
    if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
        raise ValueError(
            f"{folder}: image_grid_pinpoints must be a list of [width, height] pairs, got {points!r:.120}"
        )
    swapped = [[height, width] for width, height in points]  # official [w, h] -> our [h, w]
    return checked_anyres(swapped, f"{folder}/config.json: image_grid_pinpoints")
