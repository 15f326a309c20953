"""The tiny CLIP's region-phrase loss: it reads the patch under each object, and it trains that patch to name it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_lit.world.backbones import _object_patches, train_clip
from llava_lit.world.config import WorldConfig
from llava_lit.world.dialogues import caption, object_phrase
from llava_lit.world.scenes import generate_scene_sets, render_scene


def test_object_patches_are_the_patches_under_each_object():
    cfg = WorldConfig.ci()
    scenes = generate_scene_sets(cfg)["train"][:30]
    grid, side = cfg.patch_grid, cfg.patch_size
    rows, patches, objs = _object_patches(scenes, grid)
    assert len(objs) == sum(len(s.objects) for s in scenes)
    for row, patch, obj in zip(rows, patches, objs, strict=True):
        assert obj in scenes[row].objects
        y, x = divmod(patch, grid)
        cell = np.asarray(render_scene(scenes[row], cfg))[
            y * side : (y + 1) * side, x * side : (x + 1) * side
        ]
        # The patch holds the object's own color (at least a few pixels of it, anti-aliasing aside).
        close = np.abs(cell.reshape(-1, 3).astype(int) - cfg.palette[obj.color]).sum(1) < 20
        assert close.sum() >= 4, (scenes[row].scene_id, obj)


def test_object_phrase_names_color_shape_and_position():
    scene = generate_scene_sets(WorldConfig.ci())["train"][0]
    obj = scene.objects[0]
    phrase = object_phrase(obj.color, obj.shape, obj.position)
    assert phrase in caption(scene)  # the fragment of the caption that names this object
    assert obj.color in phrase and obj.shape in phrase
    assert phrase.split(obj.shape)[1].strip() in {
        "on the left",
        "on the right",
        "at the top",
        "at the bottom",
        "in the center",
    }


@pytest.mark.slow
def test_region_phrase_loss_falls_and_can_be_switched_off(tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world / "llm")
    cfg = WorldConfig.ci(clip_steps=40, clip_batch_size=32)
    scenes = generate_scene_sets(cfg)["train"][:128]
    pixels = torch.from_numpy(np.stack([np.asarray(render_scene(s, cfg)) for s in scenes]))
    _, summary = train_clip(pixels, scenes, tok, cfg, lambda n=1: None)
    assert summary["region_loss_last"] < 0.8 * summary["region_loss_first"]
    off = WorldConfig.ci(clip_steps=2, clip_batch_size=32, clip_region_weight=0.0)
    _, summary = train_clip(pixels, scenes, tok, off, lambda n=1: None)
    assert "region_loss_first" not in summary
