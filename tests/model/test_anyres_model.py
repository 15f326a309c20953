"""The AnyRes splice: tiles through the tower in one batch, the LLaVA-NeXT feature layout, per-image token runs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

from llava_lit.model import LlavaModel, build_llava

PINPOINTS = [
    [56, 112],
    [112, 56],
    [112, 112],
    [168, 56],
    [56, 168],
]  # the tiny 56-px tower's LLaVA-NeXT grids
SIZES = [(30, 70), (100, 40), (56, 56), (9, 200)]  # (height, width)


@pytest.fixture
def anyres_llava(tiny_backbones, tokenizer) -> LlavaModel:
    torch.manual_seed(0)
    return build_llava(
        vision_tower={"name_or_path": str(tiny_backbones / "clip")},
        projector="mlp2x_gelu",
        language_model={"name_or_path": str(tiny_backbones / "llm")},
        tokenizer=tokenizer,
        anyres={"grid_pinpoints": PINPOINTS},
    ).eval()


def _inputs(
    model: LlavaModel, sizes: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per image: `[1, 2] + run + [3]`, right-padded; the images' tiles; their sizes."""
    rng = np.random.default_rng(0)
    rows, tiles = [], []
    for height, width in sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        tiles.append(model.tile_layout.tiles(image, resample=3))
        rows.append([1, 2] + [model.image_token_id] * model.image_tokens(height, width) + [3])
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    return ids, torch.cat(tiles), torch.tensor(sizes)


def test_features_follow_transformers_llava_next_layout(anyres_llava: LlavaModel) -> None:
    """Each image's run holds what LlavaNextModel.pack_image_features makes of the same projected tiles."""
    model = anyres_llava
    ids, pixels, sizes = _inputs(model, SIZES)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixels, sizes)  # [B, L, D]
        features = model.encode_images(pixels)  # [tiles, 16, D]
        config = SimpleNamespace(
            vision_config=SimpleNamespace(image_size=56, patch_size=14), image_grid_pinpoints=PINPOINTS
        )
        per_image = torch.split(features, [model.tile_layout.num_tiles(h, w) for h, w in SIZES])
        expected, lengths = LlavaNextModel.pack_image_features(
            SimpleNamespace(config=config),
            per_image,
            sizes,
            "default",
            image_newline=model.projector.image_newline,
        )
    assert lengths.tolist() == [model.image_tokens(h, w) for h, w in SIZES]
    for row, want in enumerate(expected):
        got = embeds[row, 2 : 2 + len(want)]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradients_reach_image_newline_and_projector(anyres_llava: LlavaModel) -> None:
    model = anyres_llava.train()
    ids, pixels, sizes = _inputs(model, SIZES[:2])
    out = model(ids, (ids != 0).long(), pixels, image_sizes=sizes)
    out.logits.float().square().mean().backward()
    assert (
        model.projector.image_newline.grad is not None and model.projector.image_newline.grad.abs().sum() > 0
    )
    assert model.projector[0].weight.grad.abs().sum() > 0


def test_image_newline_is_a_projector_weight(anyres_llava: LlavaModel) -> None:
    assert "projector.image_newline" in anyres_llava.state_dict()
    assert anyres_llava.projector.image_newline.shape == (anyres_llava.language_model.config.hidden_size,)


def test_without_newline_or_unpad_the_counts_change(tiny_backbones, tokenizer) -> None:
    model = build_llava(
        vision_tower={"name_or_path": str(tiny_backbones / "clip")},
        projector="mlp2x_gelu",
        language_model={"name_or_path": str(tiny_backbones / "llm")},
        tokenizer=tokenizer,
        anyres={"grid_pinpoints": PINPOINTS, "unpad": False, "newline": False},
    ).eval()
    assert not hasattr(model.projector, "image_newline")
    assert model.image_tokens(30, 70) == 16 + 4 * 8  # whole view + the 1x2-tile map of 4x8 features
    ids, pixels, sizes = _inputs(model, [(30, 70)])
    with torch.no_grad():
        model.embed_inputs(ids, pixels, sizes)


def test_sizes_missing_or_wrong_are_refused(anyres_llava: LlavaModel) -> None:
    ids, pixels, sizes = _inputs(anyres_llava, SIZES[:2])
    with pytest.raises(ValueError, match="image_sizes"):
        anyres_llava.embed_inputs(ids, pixels, None)
    with pytest.raises(ValueError, match="tiles"):
        anyres_llava.embed_inputs(ids, pixels[:-1], sizes)
    swapped = sizes.flip(0)  # same tiles in all, other token counts: the runs no longer fit
    with pytest.raises(ValueError, match="consecutive|image-token positions"):
        anyres_llava.embed_inputs(ids, pixels, swapped)
