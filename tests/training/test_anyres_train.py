"""AnyRes (LLaVA-NeXT) end to end on the tiny backbones: a base-resolution align stage, an AnyRes finetune with the
tower unfrozen and packing on, and the checkpoint answering images of new aspect ratios through the one loader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lit.images import TiledImage
from llava_lit.inference import SamplingParams, load_for_inference
from llava_lit.train import build_components, train

ANYRES = (
    "data.image_aspect=anyres",
    "model.anyres={grid_pinpoints: [[56, 112], [112, 56], [112, 112]]}",  # the tiny 56-px tower's 1x2, 2x1, 2x2
)


def _png(height: int, width: int) -> bytes:
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_anyres_finetune_trains_and_answers(compose_train):
    align = compose_train("trainer.max_steps=2", "trainer.limit_val_batches=0", stage="align")
    train(align)
    cfg = compose_train(
        *ANYRES,
        "stage.train_vision_tower=true",
        "module.vision_tower_lr=1e-4",
        "data.packing=true",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        stage="finetune",
    )
    module, datamodule = build_components(cfg)
    model = module.model
    newline = model.projector.image_newline.detach().clone()
    tower = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    # The tiny shards' 64x48 images take the 2x1-tile grid: whole view + 2 tiles, 16 + 8*5 tokens each.
    n_images = int(batch["image_sizes"].shape[0])
    assert batch["image_sizes"].tolist() == [[48, 64]] * n_images
    assert batch["pixel_values"].shape[0] == 3 * n_images
    image_tokens = model.image_tokens(48, 64)
    assert int((batch["input_ids"] == model.image_token_id).sum()) == n_images * image_tokens
    assert "position_ids" in batch  # packed

    from llava_lit.train import build_trainer

    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert not torch.equal(model.projector.image_newline.detach(), newline)
    assert any(not torch.equal(v, model.vision_tower.state_dict()[k]) for k, v in tower.items())

    bundle = load_for_inference(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert bundle.model.tile_layout is not None
    torch.testing.assert_close(bundle.model.projector.image_newline, model.projector.image_newline.detach())
    images = [bundle.image_loader(_png(h, w)) for h, w in ((30, 90), (100, 40))]
    assert all(isinstance(image, TiledImage) for image in images)
    prompts = [
        bundle.prompt([{"from": "human", "value": "<image>\nWhat color?"}], [image]) for image in images
    ]
    for prompt, image in zip(prompts, images, strict=True):
        runs = sum(1 for t in prompt.input_ids if t == bundle.model.image_token_id)
        assert runs == bundle.model.image_tokens(*image.size)
    completions = bundle.generator().generate(prompts, SamplingParams(max_new_tokens=4))
    assert len(completions) == 2 and all(len(c.token_ids) >= 1 for c in completions)
    # Batched generation equals each prompt alone (left padding, per-image runs of different lengths).
    alone = [bundle.generator().generate([p], SamplingParams(max_new_tokens=4))[0] for p in prompts]
    assert [c.token_ids for c in completions] == [c.token_ids for c in alone]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(ANYRES[:1], "model.anyres=null"), (ANYRES[1:], "model.anyres=set")],
)
def test_anyres_needs_both_the_aspect_and_the_model_settings(compose_train, overrides, message):
    cfg = compose_train(*overrides, "init_projector=null", stage="finetune")
    with pytest.raises(SystemExit, match=message):
        build_components(cfg)
