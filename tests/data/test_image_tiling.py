"""AnyRes tiling against transformers' LLaVA-NeXT image processor, processor token count and `unpad_image`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches, unpad_image

from llava_lit.image_tiling import LLAVA_NEXT_PINPOINTS, AnyResSettings, TileLayout, select_best_resolution
from llava_lit.images import normalize_pixels, pixel_table

# (height, width): square, wide, tall, extreme, tiny, odd, and sizes on both sides of each pinpoint's ratio.
SIZES = [
    (336, 336), (480, 640), (640, 480), (200, 1000), (1000, 200), (17, 23), (333, 677), (1080, 1920),
    (1920, 1080), (500, 500), (700, 340), (340, 700), (1009, 335), (99, 1001), (768, 1024), (1, 5),
]  # fmt: skip


def _layout(base: int = 336, grid: int = 24, **kw) -> TileLayout:
    return TileLayout(AnyResSettings(**kw), base=base, feature_grid=grid)


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + height * 7 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_best_resolution_and_tile_count_match_transformers(height: int, width: int) -> None:
    layout = _layout()
    pinpoints = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    assert layout.resolution(height, width) == tuple(hf_select_best_resolution((height, width), pinpoints))
    assert layout.num_tiles(height, width) == image_size_to_num_patches((height, width), pinpoints, 336)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_token_count_matches_the_llava_next_processor(height: int, width: int) -> None:
    """transformers' `_get_number_of_features` minus the CLS (the `default` feature strategy)."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    processor = LlavaNextProcessor.__new__(LlavaNextProcessor)  # only the arithmetic is used
    processor.image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS]
    )
    processor.patch_size = 14
    processor.num_additional_image_tokens = 1
    expected = processor._get_number_of_features(height, width, 336, 336) - 1
    assert _layout().num_tokens(height, width) == expected


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_unpadded_map_matches_unpad_image(height: int, width: int) -> None:
    layout = _layout()
    rows, cols = layout.grid(height, width)
    fmap = torch.zeros(1, rows * 24, cols * 24)
    assert layout.feature_map_size(height, width) == tuple(unpad_image(fmap, (height, width)).shape[1:])


def test_settings_switch_the_token_count() -> None:
    full = _layout()
    assert (
        _layout(newline=False).num_tokens(480, 640)
        == full.num_tokens(480, 640) - full.feature_map_size(480, 640)[0]
    )
    padded = _layout(unpad=False)
    assert padded.feature_map_size(480, 640) == (48, 48)  # 672x672 canvas: 2x2 tiles of 24x24 features
    assert padded.num_tokens(480, 640) == 576 + 48 * 48 + 48


@pytest.mark.parametrize(("height", "width"), [(480, 640), (200, 1000), (1000, 200), (336, 336), (17, 23)])
def test_tiles_equal_the_llava_next_image_processor(height: int, width: int) -> None:
    """Tiles equal `LlavaNextImageProcessor` (PIL backend) output pixel for pixel, whole view first: the only
    difference is the float rounding of the two normalisations (1 ulp), far below one 8-bit level (0.015)."""
    from llava_lit.model.vision_tower import _clip_processor_for

    pinpoints = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    hf = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    image = _image(height, width)
    expected = hf(images=image, return_tensors="pt")
    tiles = _layout().tiles(image, resample=3)  # bicubic, CLIP's filter
    n = tiles.shape[0]
    assert n == _layout().num_tiles(height, width)
    assert expected["image_sizes"][0].tolist() == [height, width]
    ours = normalize_pixels(tiles, pixel_table(_clip_processor_for(336)))
    torch.testing.assert_close(ours, expected["pixel_values"][0, :n].float(), rtol=0, atol=1e-6)


def test_select_best_resolution_prefers_less_waste_on_ties() -> None:
    # Both 336x672 and 672x672 keep all of a 300x600 image; the smaller canvas wastes less.
    assert select_best_resolution(300, 600, [(672, 672), (336, 672)]) == (336, 672)


@pytest.mark.parametrize("bad", [[[336, 500]], [[0, 336]], [], [[336]]])
def test_pinpoints_must_be_tile_multiples(bad: list) -> None:
    with pytest.raises(ValueError, match="grid_pinpoints"):
        _layout(grid_pinpoints=bad)


def _png(height: int, width: int) -> bytes:
    import io

    buffer = io.BytesIO()
    _image(height, width).save(buffer, format="PNG")
    return buffer.getvalue()


def test_encoder_expands_each_image_to_its_own_count_and_collate_keeps_sizes(tiny_backbones) -> None:
    """Two images of different shapes in one sample: two runs of their own lengths, tiles in order, sizes kept;
    a sample whose truncation would cut a run is skipped, not cut."""
    import json

    from llava_lit.collate import collate, collate_packed
    from llava_lit.conversation import get_template
    from llava_lit.datamodule import SampleEncoder
    from llava_lit.images import ImageLoader
    from llava_lit.model.vision_tower import _clip_processor_for
    from llava_lit.tokenization import SkipSample, image_token_id, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_backbones / "llm"))
    layout = _layout(base=56, grid=4, grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
    loader = ImageLoader(_clip_processor_for(56), aspect="anyres", tile_layout=layout)
    encoder = SampleEncoder(tokenizer, loader, get_template("vicuna_v1"), num_image_tokens=16, max_length=512)
    conversation = [
        {"from": "human", "value": "<image>\n<image>\nCompare them."},
        {"from": "gpt", "value": "The first is wider."},
    ]
    record = {"id": "two", "conversations": conversation, "image_keys": ["0.png", "1.png"]}
    raw = {"json": json.dumps(record).encode(), "0.png": _png(30, 90), "1.png": _png(100, 40)}
    sample = encoder(raw)
    image_id = image_token_id(tokenizer)
    ids = sample["input_ids"].tolist()
    runs, length = [], 0
    for token in ids + [-1]:
        if token == image_id:
            length += 1
        elif length:
            runs, length = runs + [length], 0
    assert runs == [layout.num_tokens(30, 90), layout.num_tokens(100, 40)]
    assert sample["pixel_values"].shape == (layout.num_tiles(30, 90) + layout.num_tiles(100, 40), 3, 56, 56)
    assert sample["image_sizes"].tolist() == [[30, 90], [100, 40]]
    text = {"json": json.dumps({"id": "t", "conversations": conversation[:0] + [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}).encode()}  # fmt: skip
    text_sample = encoder(text)
    for batch in (collate([sample, text_sample], 0), collate_packed([[sample, text_sample]], 0)):
        assert batch["image_sizes"].tolist() == [[30, 90], [100, 40]]
        assert batch["pixel_values"].shape[0] == sample["pixel_values"].shape[0]
    short = SampleEncoder(tokenizer, loader, get_template("vicuna_v1"), num_image_tokens=16, max_length=60)
    with pytest.raises(SkipSample, match="truncation_cuts_image"):
        short(raw)


def test_loader_aspect_and_model_layout_must_agree() -> None:
    from llava_lit.images import ImageLoader
    from llava_lit.model.vision_tower import _clip_processor_for

    with pytest.raises(ValueError, match="anyres"):
        ImageLoader(_clip_processor_for(56), aspect="anyres")
    with pytest.raises(ValueError, match="anyres"):
        ImageLoader(
            _clip_processor_for(56),
            aspect="pad",
            tile_layout=_layout(base=56, grid=4, grid_pinpoints=[[56, 112]]),
        )
    with pytest.raises(ValueError, match="tiles of 336"):
        ImageLoader(_clip_processor_for(56), aspect="anyres", tile_layout=_layout())


@pytest.mark.parametrize(("height", "width"), [(480, 640), (1000, 200)])
def test_loader_resizes_tiles_with_its_backend(height: int, width: int) -> None:
    """`resize="pil"` gives the processor's pixels; `"torch"` resizes the whole view and the fitted image with
    torch's kernel: the same layout, within two 8-bit levels of PIL."""
    import io

    from llava_lit.images import ImageLoader
    from llava_lit.model.vision_tower import _clip_processor_for

    buffer = io.BytesIO()
    Image.fromarray(
        np.array(_image(height, width).resize((width // 8, height // 8))).repeat(8, 0).repeat(8, 1)
    ).save(buffer, format="PNG")  # smooth blocks: resizes of noise differ by more than a resize's rounding
    data = buffer.getvalue()
    loaders = {
        backend: ImageLoader(_clip_processor_for(336), aspect="anyres", tile_layout=_layout(), resize=backend)
        for backend in ("pil", "torch")
    }
    pil, torch_ = (loaders[b](data).pixels for b in ("pil", "torch"))
    assert torch.equal(pil, _layout().tiles(Image.open(io.BytesIO(data)).convert("RGB"), resample=3))
    assert pil.shape == torch_.shape and not torch.equal(pil, torch_)
    difference = (pil.int() - torch_.int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.05  # measured: 2 and 0.007-0.008
