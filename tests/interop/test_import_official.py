"""Official LLaVA checkpoints (full, with or without the tower, and stage-1 projectors) import with equal logits.

The official-format folders are written here from a tiny llava_lit model with the official key layout spelled out
independently of the importer: `model.mm_projector.{0,2}`, LLaMA keys under `model.*`, `lm_head.weight`,
`model.vision_tower.vision_tower.vision_model.*`, a `llava_llama` config.json and a tokenizer without `<image>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference_helpers import write_official
from llava_lit.checkpoint_reader import read_checkpoint


def _logits(model, image_token_id: int) -> torch.Tensor:
    torch.manual_seed(3)
    ids = torch.tensor([[1, 319, 4558, *([image_token_id] * model.num_image_tokens), 1724, 338, 445, 29973]])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), torch.randn(1, 3, 56, 56)).logits


@pytest.mark.parametrize("with_tower", [False, True])
def test_official_checkpoint_gives_same_logits(
    with_tower: bool, make_tiny, tiny_backbones: Path, llama_tokenizer_dir: Path, tmp_path: Path
) -> None:
    original = make_tiny(seed=5)
    if (
        with_tower
    ):  # make the tower differ from the CLIP folder, so equal logits prove its weights were imported
        with torch.no_grad():
            for param in original.vision_tower.backbone.parameters():
                param.add_(0.01 * torch.randn_like(param))
    folder = write_official(
        original, tmp_path / "official", tiny_backbones, llama_tokenizer_dir, with_tower=with_tower
    )

    pretrained = read_checkpoint(str(folder), workdir=tmp_path / "work")
    assert pretrained.kind == "official" and pretrained.image_aspect == "pad"
    assert pretrained.pretrained_parts == (() if with_tower else ("vision_tower.",))
    model, tokenizer = pretrained.build()
    assert model.image_token_id == original.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    torch.testing.assert_close(
        _logits(model.eval(), model.image_token_id), _logits(original, original.image_token_id)
    )


def test_stage1_projector_folder_imports(
    make_tiny, tiny_backbones: Path, llama_tokenizer_dir: Path, tmp_path: Path
):
    original = make_tiny(seed=7)
    folder = tmp_path / "stage1"
    folder.mkdir()
    torch.save(
        {f"model.mm_projector.{k}": v for k, v in original.projector.state_dict().items()},
        folder / "mm_projector.bin",
    )
    config = {
        "model_type": "llava_llama",
        "_name_or_path": str(tiny_backbones / "llm"),
        "mm_vision_tower": str(tiny_backbones / "clip"),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
    }
    (folder / "config.json").write_text(json.dumps(config))

    pretrained = read_checkpoint(str(folder / "mm_projector.bin"), workdir=tmp_path / "work")
    assert pretrained.kind == "official_projector" and pretrained.image_aspect == "crop"
    model, _ = pretrained.build()
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_unsupported_official_checkpoints_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "next"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llava_llama", "mm_vision_tower": "x", "image_aspect_ratio": "anyres"})
    )
    with pytest.raises(ValueError, match="anyres"):
        read_checkpoint(str(folder), workdir=tmp_path / "work")
    lonely = tmp_path / "lonely" / "mm_projector.bin"
    lonely.parent.mkdir()
    torch.save({}, lonely)
    with pytest.raises(ValueError, match="init_projector"):
        read_checkpoint(str(lonely))
