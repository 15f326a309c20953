"""Which parts receive gradients: frozen tower by default, trainable by config; bf16 tower beside fp32 rest."""

from __future__ import annotations

import torch

from llava_lit.model import LlavaModel


def backward_once(model: LlavaModel, image_row) -> None:
    model.train()
    ids = torch.tensor([image_row(model, [1, 319], [450, 13])])
    out = model(ids, torch.ones_like(ids), torch.randn(1, 3, 56, 56))
    out.logits.float().logsumexp(-1).mean().backward()


def test_frozen_tower_gets_no_grad_projector_and_llm_do(build_tiny, image_row) -> None:
    model = build_tiny()
    backward_once(model, image_row)
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert model.language_model.get_input_embeddings().weight.grad is not None


def test_trainable_tower_gets_grad(build_tiny, image_row) -> None:
    model = build_tiny(trainable=True)
    backward_once(model, image_row)
    # Layer -2 of a 2-block tower is the first block's output: the last block is never used (as in LLaVA).
    first_block = model.vision_tower.blocks[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_block.parameters())
    assert model.vision_tower.backbone.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_unfreezing_later_by_requires_grad_takes_effect(build_tiny, image_row) -> None:
    """A stage callback flipping requires_grad on the tower needs no rebuild."""
    model = build_tiny()
    model.vision_tower.requires_grad_(True)
    backward_once(model, image_row)
    assert model.vision_tower.backbone.embeddings.patch_embedding.weight.grad is not None


def test_bf16_tower_with_fp32_projector_and_llm(build_tiny, image_row) -> None:
    model = build_tiny(dtype="bfloat16")
    assert model.vision_tower.dtype == torch.bfloat16
    assert next(model.projector.parameters()).dtype == torch.float32
    ids = torch.tensor([image_row(model, [1], [13])])
    features = model.encode_images(torch.randn(1, 3, 56, 56))
    assert features.dtype == torch.float32
    out = model(ids, torch.ones_like(ids), torch.randn(1, 3, 56, 56))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    backward_once(model, image_row)
    assert all(p.grad is not None for p in model.projector.parameters())
