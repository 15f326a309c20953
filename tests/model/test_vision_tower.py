"""Vision towers: HF CLIP and timm ViTs, feature layer/selection, image processor, freezing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionModel

from llava_lit.model import build_vision_tower


def test_hf_clip_patch_features_are_penultimate_layer_without_cls(tiny_backbones: Path) -> None:
    tower = build_vision_tower({"name_or_path": str(tiny_backbones / "clip")})
    assert (tower.num_image_tokens, tower.hidden_size, len(tower.blocks)) == (16, 32, 2)
    pixels = torch.randn(3, 3, 56, 56)
    features = tower(pixels)
    reference = CLIPVisionModel.from_pretrained(tiny_backbones / "clip")
    expected = reference(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(features, expected)


def test_hf_clip_cls_patch_keeps_cls_first(tiny_backbones: Path) -> None:
    tower = build_vision_tower({"name_or_path": str(tiny_backbones / "clip"), "select_feature": "cls_patch"})
    assert tower.num_image_tokens == 17
    pixels = torch.randn(2, 3, 56, 56)
    features = tower(pixels)
    assert features.shape == (2, 17, 32)
    expected = tower.backbone(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(features, expected)


def test_hf_clip_ships_its_image_processor(tiny_backbones: Path) -> None:
    tower = build_vision_tower({"name_or_path": str(tiny_backbones / "clip")})
    assert isinstance(tower.image_processor, CLIPImageProcessor)
    image = (np.random.default_rng(0).random((80, 120, 3)) * 255).astype(np.uint8)
    pixels = tower.image_processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 56, 56)
    assert tower(pixels).shape == (1, 16, 32)


def test_tower_frozen_by_default_and_trainable_by_config(tiny_backbones: Path) -> None:
    frozen = build_vision_tower({"name_or_path": str(tiny_backbones / "clip")})
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.train().backbone.training  # a frozen tower stays in eval mode
    assert not frozen(torch.randn(1, 3, 56, 56)).requires_grad
    trainable = build_vision_tower({"name_or_path": str(tiny_backbones / "clip"), "trainable": True})
    assert all(p.requires_grad for p in trainable.parameters())
    assert trainable.train().backbone.training
    assert trainable(torch.randn(1, 3, 56, 56)).requires_grad


def test_feature_layer_out_of_range_raises(tiny_backbones: Path) -> None:
    with pytest.raises(ValueError, match="out of range"):
        build_vision_tower({"name_or_path": str(tiny_backbones / "clip"), "feature_layer": -4})


def test_unknown_backend_and_selection_raise(tiny_backbones: Path) -> None:
    with pytest.raises(ValueError, match="hf_clip, timm"):
        build_vision_tower({"name_or_path": "x", "backend": "openclip"})
    with pytest.raises(ValueError, match="patch, cls_patch"):
        build_vision_tower({"name_or_path": str(tiny_backbones / "clip"), "select_feature": "full"})


TIMM_TINY = {"img_size": 32, "depth": 3}


@pytest.mark.parametrize(("select", "tokens"), [("patch", 4), ("cls_patch", 5)])
def test_timm_vit_tower(select: str, tokens: int) -> None:
    tower = build_vision_tower(
        {
            "name_or_path": "vit_tiny_patch16_224",
            "backend": "timm",
            "pretrained": False,
            "select_feature": select,
            "timm_kwargs": TIMM_TINY,
        }
    )
    assert (tower.num_image_tokens, tower.hidden_size, len(tower.blocks)) == (tokens, 192, 3)
    pixels = torch.randn(2, 3, 32, 32)
    features = tower(pixels)
    assert features.shape == (2, tokens, 192)
    # Layer -2 is the output of the second of three blocks, before the final norm: recompute it by hand.
    backbone = tower.backbone
    x = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(pixels)))
    for block in backbone.blocks[:2]:
        x = block(x)
    expected = x[:, 1:] if select == "patch" else x
    torch.testing.assert_close(features, expected)


def test_timm_image_processor_matches_model_resolution() -> None:
    tower = build_vision_tower(
        {
            "name_or_path": "vit_tiny_patch16_224",
            "backend": "timm",
            "pretrained": False,
            "timm_kwargs": TIMM_TINY,
        }
    )
    proc = tower.image_processor
    assert (proc.crop_size["height"], proc.crop_size["width"]) == (32, 32)
    assert list(proc.image_mean) == [0.5, 0.5, 0.5] and list(proc.image_std) == [0.5, 0.5, 0.5]
    image = (np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)
    pixels = proc(images=image, return_tensors="pt")["pixel_values"]
    assert tower(pixels).shape == (1, 4, 192)
