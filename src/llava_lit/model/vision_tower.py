"""The vision tower: a pretrained ViT that turns images into one feature vector per image token.

Two backends share one interface: a Hugging Face `CLIPVisionModel` (the LLaVA default, loaded from a hub id or a
local folder) and any `timm` Vision Transformer (SigLIP, DINOv2, CLIP, ... by timm model name). Features are read
from a configurable layer (LLaVA uses the penultimate one, -2) and either drop the prefix tokens (`patch`) or keep
the CLS token in front of the patches (`cls_patch`).

The tower is frozen by default like LLaVA's, but unlike the official code its forward is not hard-wired under
`torch.no_grad`: gradients flow whenever any of its parameters requires grad, so it can be unfrozen by config or by
a stage callback.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from accelerate import init_empty_weights
from timm.data import resolve_model_data_config
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from llava_lit.images import normalize_pixels, pixel_table
from llava_lit.model.dtypes import parse_dtype

FeatureSelect = Literal["patch", "cls_patch"]
_FEATURE_SELECTS = ("patch", "cls_patch")
_BACKENDS = ("hf_clip", "timm")

# timm names its interpolations by string; CLIPImageProcessor wants PIL's resampling ids.
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


@dataclass
class VisionTowerConfig:
    """How to build the vision tower."""

    name_or_path: str
    """`hf_clip`: a hub id (e.g. `openai/clip-vit-large-patch14-336`) or a local folder holding a `CLIPVisionModel`
    or `CLIPModel` checkpoint and its `preprocessor_config.json`. `timm`: a timm model name (e.g.
    `vit_so400m_patch14_siglip_384`)."""

    backend: Literal["hf_clip", "timm"] = "hf_clip"
    """Which library builds the tower."""

    feature_layer: int = -2
    """Index into the hidden-state list `[embeddings, block_1, ..., block_L]` (Hugging Face's `hidden_states`
    convention). -2 is the output of the penultimate block, as in LLaVA."""

    select_feature: FeatureSelect = "patch"
    """`patch` drops the CLS (and any other prefix) tokens; `cls_patch` keeps the CLS token before the patches."""

    pretrained: bool = True
    """Load pretrained weights. False builds the architecture with random init (from `config_path` if set)."""

    config_path: str | None = None
    """`hf_clip` only: a JSON file holding a `CLIPVisionConfig` or a full `CLIPConfig` (its `vision_config` is
    used). When set, the architecture comes from this file, not from `name_or_path`; weights are then loaded only
    if `pretrained` and `name_or_path` is a checkpoint."""

    trainable: bool = False
    """Leave the tower's parameters trainable. LLaVA keeps it frozen; set True to finetune it."""

    dtype: str | None = None
    """Parameter dtype of the tower (`float32`, `bfloat16`, `float16`); None keeps float32. A frozen tower can run
    in bf16 while the rest of the model trains in fp32/bf16-mixed: pixels are cast in and features cast back."""

    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """`timm` only: extra keyword arguments for `timm.create_model` (e.g. `img_size`, `depth`,
    `pretrained_cfg_overlay`)."""


def load_clip_vision_config(path: str | Path) -> CLIPVisionConfig:
    """Read a CLIP vision config from a JSON file that holds either a `CLIPVisionConfig` or a full `CLIPConfig`."""
    data = json.loads(Path(path).read_text())
    vision = data.get("vision_config", data)
    vision = {
        k: v for k, v in vision.items() if k not in ("model_type", "architectures", "transformers_version")
    }
    return CLIPVisionConfig(**vision)


def _clip_processor_for(image_size: int) -> CLIPImageProcessor:
    """The standard CLIP preprocessing (shortest-edge resize + center crop, CLIP mean/std) at `image_size`."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


class VisionTower(nn.Module):
    """Images `[N, 3, H, W]` -> features `[N, num_image_tokens, hidden_size]`.

    Attributes used elsewhere: `image_processor` (a `CLIPImageProcessor` matching the tower's preprocessing),
    `num_image_tokens`, `hidden_size`, `blocks` (the transformer blocks, for FSDP wrapping and activation
    checkpointing) and `backbone` (the wrapped HF or timm model).

    Pixels come either as uint8 (resized and cropped, not normalised: the data path's default), which the tower
    normalises with its processor's own values (`images.pixel_table`, bit for bit the processor's float output),
    or as floats taken as already normalised.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        backend: str,
        image_processor: CLIPImageProcessor,
        feature_layer: int = -2,
        select_feature: FeatureSelect = "patch",
    ) -> None:
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"unknown vision backend {backend!r}; allowed: {', '.join(_BACKENDS)}")
        if select_feature not in _FEATURE_SELECTS:
            raise ValueError(
                f"unknown select_feature {select_feature!r}; allowed: {', '.join(_FEATURE_SELECTS)}"
            )
        self.backbone = backbone
        self.backend = backend
        self.image_processor = image_processor
        self.feature_layer = feature_layer
        self.select_feature = select_feature
        self._pixel_tables: dict[torch.device, torch.Tensor] = {}  # device -> FloatTensor[3, 256]

        num_blocks = len(self.blocks)
        # hidden_states has num_blocks + 1 entries (embeddings first); reject indices outside it now, not mid-run.
        if not -(num_blocks + 1) <= feature_layer <= num_blocks:
            raise ValueError(
                f"feature_layer {feature_layer} out of range for a tower with {num_blocks} blocks"
            )
        if backend == "timm":
            # timm returns block outputs only; index 0 / -(L+1) (the raw embeddings) has no block to take it from.
            if feature_layer in (0, -(num_blocks + 1)):
                raise ValueError("feature_layer must select a transformer block's output for timm towers")
            self._timm_block = feature_layer - 1 if feature_layer > 0 else num_blocks + feature_layer
            self._num_prefix = int(backbone.num_prefix_tokens)
            if select_feature == "cls_patch" and getattr(backbone, "cls_token", None) is None:
                raise ValueError("select_feature='cls_patch' needs a CLS token, and this timm model has none")
            self._num_patches = int(backbone.patch_embed.num_patches)
            self._hidden_size = int(backbone.embed_dim)
        else:
            cfg = backbone.config
            self._num_patches = (cfg.image_size // cfg.patch_size) ** 2
            self._hidden_size = int(cfg.hidden_size)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (the unit to wrap for FSDP / activation checkpointing)."""
        if self.backend == "timm":
            return self.backbone.blocks
        # transformers 5 flattened CLIPVisionModel (no `.vision_model`); older checkpoints' classes still nest it.
        return getattr(self.backbone, "vision_model", self.backbone).encoder.layers

    @property
    def num_image_tokens(self) -> int:
        """Feature vectors per image: patches, plus one for the CLS token with `cls_patch`."""
        return self._num_patches + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def hidden_size(self) -> int:
        """Width of each feature vector."""
        return self._hidden_size

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the tower's parameters (pixels are cast to it)."""
        return next(self.backbone.parameters()).dtype

    @property
    def is_trainable(self) -> bool:
        """Whether any tower parameter currently requires grad (checked live so a stage callback can flip it)."""
        return any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> VisionTower:
        """Keep a frozen tower in eval mode even when the surrounding model trains (no dropout/drop-path noise)."""
        super().train(mode)
        if mode and not self.is_trainable:
            self.backbone.eval()
        return self

    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [N, 3, H, W] -> float32 as the image processor normalises them, on their own device."""
        table = self._pixel_tables.get(pixel_values.device)
        if table is None:
            if not self._pixel_tables:
                self._pixel_tables[torch.device("cpu")] = pixel_table(self.image_processor)
            table = next(iter(self._pixel_tables.values())).to(pixel_values.device)
            self._pixel_tables[pixel_values.device] = table
        return normalize_pixels(pixel_values, table)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images (uint8 pixels are normalised first, float ones are taken as normalised) in the tower's
        dtype."""
        # pixel_values: [N, 3, H, W]
        if pixel_values.dtype == torch.uint8:
            pixel_values = self.normalize(pixel_values)  # fp32 normalisation, then the cast below
        pixel_values = pixel_values.to(self.dtype)
        # A frozen tower needs no autograd graph: skip it to save activation memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.is_trainable):
            if self.backend == "timm":
                return self._forward_timm(pixel_values)
            return self._forward_hf(pixel_values)

    def _forward_hf(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]  # [N, 1 + P, C], CLS first
        if self.select_feature == "patch":
            hidden = hidden[:, 1:]  # [N, P, C]
        return hidden

    def _forward_timm(self, pixel_values: torch.Tensor) -> torch.Tensor:
        ((patches, prefix),) = self.backbone.forward_intermediates(
            pixel_values,
            indices=[self._timm_block],
            return_prefix_tokens=True,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )  # patches: [N, P, C]; prefix: [N, num_prefix, C] (CLS first, then registers)
        if self.select_feature == "cls_patch":
            return torch.cat([prefix[:, :1], patches], dim=1)  # [N, 1 + P, C]
        return patches


def _build_hf_clip(
    cfg: VisionTowerConfig, on_meta: bool, empty_weights: bool
) -> tuple[nn.Module, CLIPImageProcessor]:
    local = Path(cfg.name_or_path)
    if cfg.config_path is not None:
        vcfg = load_clip_vision_config(cfg.config_path)
    else:
        vcfg = CLIPVisionConfig.from_pretrained(cfg.name_or_path)
    if cfg.pretrained and not on_meta and not empty_weights:
        backbone = CLIPVisionModel.from_pretrained(cfg.name_or_path, config=vcfg)
    else:
        with init_empty_weights(include_buffers=False) if empty_weights else nullcontext():
            backbone = CLIPVisionModel(vcfg)
    # The processor that ships with the checkpoint is the truth; a config-only build gets CLIP's standard one.
    if (local / "preprocessor_config.json").exists() or (cfg.pretrained and not on_meta):
        processor = CLIPImageProcessor.from_pretrained(cfg.name_or_path)
    else:
        processor = _clip_processor_for(vcfg.image_size)
    return backbone, processor


def _timm_processor_for(model: nn.Module) -> CLIPImageProcessor:
    """A `CLIPImageProcessor` equivalent to timm's evaluation transform for `model`.

    timm's data config keeps the pretrained resolution even when `img_size` is overridden, so the crop size comes
    from the model's patch embedding; the resize edge follows timm's `crop_pct` (resize to crop / crop_pct).
    """
    data_cfg = resolve_model_data_config(model)
    height, width = model.patch_embed.img_size
    crop_pct = data_cfg.get("crop_pct", 1.0) or 1.0
    interpolation = data_cfg.get("interpolation", "bicubic")
    if interpolation not in _PIL_RESAMPLE:
        raise ValueError(f"timm interpolation {interpolation!r} has no PIL equivalent")
    return CLIPImageProcessor(
        size={"shortest_edge": int(min(height, width) / crop_pct)},
        crop_size={"height": height, "width": width},
        resample=_PIL_RESAMPLE[interpolation],
        image_mean=list(data_cfg["mean"]),
        image_std=list(data_cfg["std"]),
        do_center_crop=True,
    )


def build_vision_tower(
    cfg: VisionTowerConfig | dict[str, Any], *, on_meta: bool = False, empty_weights: bool = False
) -> VisionTower:
    """Build (and load, unless `on_meta`, `empty_weights` or not `pretrained`) the vision tower described by `cfg`.

    With `on_meta` the caller has entered `torch.device("meta")`: only the architecture is built, never weights.
    With `empty_weights` the parameters stay on the meta device and buffers are real, for the caller to assign
    the weights (`load_state_dict(..., assign=True)`); the image processor is the one a normal build reads.
    """
    if isinstance(cfg, dict):
        cfg = VisionTowerConfig(**cfg)
    if cfg.backend == "hf_clip":
        backbone, processor = _build_hf_clip(cfg, on_meta, empty_weights)
    elif cfg.backend == "timm":
        with init_empty_weights(include_buffers=False) if empty_weights else nullcontext():
            backbone = timm.create_model(
                cfg.name_or_path,
                pretrained=cfg.pretrained and not on_meta and not empty_weights,
                **cfg.timm_kwargs,
            )
        processor = _timm_processor_for(backbone)
    else:
        raise ValueError(f"unknown vision backend {cfg.backend!r}; allowed: {', '.join(_BACKENDS)}")
    dtype = parse_dtype(cfg.dtype)
    if dtype is not None:
        backbone.to(dtype)
    backbone.requires_grad_(cfg.trainable)
    return VisionTower(
        backbone,
        backend=cfg.backend,
        image_processor=processor,
        feature_layer=cfg.feature_layer,
        select_feature=cfg.select_feature,
    )
