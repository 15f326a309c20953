"""Packed rows through the real model: each sample's logits, loss and gradients equal its unpacked ones (fp32),
and do not depend on its pack-mates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_lit.collate import collate, collate_packed
from llava_lit.constants import IGNORE_INDEX
from llava_lit.model import LlavaModel, build_llava
from llava_lit.module import next_token_loss


def build(tiny_backbones: Path, tokenizer, attention: str) -> LlavaModel:
    torch.manual_seed(0)
    return build_llava(
        vision_tower={"name_or_path": str(tiny_backbones / "clip")},
        projector="mlp2x_gelu",
        language_model={"name_or_path": str(tiny_backbones / "llm"), "attn_implementation": attention},
        tokenizer=tokenizer,
    )


def make_samples(model: LlavaModel, seed: int = 0) -> list[dict]:
    """Four samples of different lengths, two with an image (one run each), labels on their second half."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, (n_text, image) in enumerate([(9, True), (5, False), (12, True), (7, False)]):
        text = torch.randint(3, 31000, (n_text,), generator=gen)
        run = (
            torch.full((model.num_image_tokens,), model.image_token_id)
            if image
            else torch.empty(0, dtype=torch.long)
        )
        ids = torch.cat([torch.tensor([1]), run, text])
        labels = ids.clone()
        labels[: len(ids) - n_text // 2] = IGNORE_INDEX
        pixels = torch.randn(1, 3, 56, 56, generator=gen) if image else None
        out.append({"id": f"s{seed}_{k}", "input_ids": ids, "labels": labels, "pixel_values": pixels})
    return out


def logits_of(model: LlavaModel, batch: dict) -> torch.Tensor:
    position_ids = batch.get("position_ids")
    return model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        position_ids=position_ids,
        packed=position_ids is not None,
    ).logits


def per_sample_logits(batch: dict, logits: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Each sample's logits [len, V], in `batch["ids"]` order."""
    out = []
    if "position_ids" not in batch:
        return [logits[r, :n] for r, n in enumerate(lengths)]
    for r in range(logits.shape[0]):
        starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist()
        real = int(batch["attention_mask"][r].sum())
        for a, b in zip(starts, starts[1:] + [real], strict=True):
            out.append(logits[r, a:b])
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_equals_unpacked_logits_loss_and_gradients(tiny_backbones, tokenizer, attention):
    model = build(tiny_backbones, tokenizer, attention).train()
    samples = make_samples(model)
    lengths = [len(s["input_ids"]) for s in samples]
    plain = collate(samples, tokenizer.pad_token_id)
    packed = collate_packed([[samples[0], samples[1]], [samples[2], samples[3]]], tokenizer.pad_token_id)
    assert packed["ids"] == plain["ids"]

    results = []
    for batch in (plain, packed):
        model.zero_grad()
        logits = logits_of(model, batch)
        loss = next_token_loss(logits, batch["labels"], reduction="sum")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((per_sample_logits(batch, logits.detach(), lengths), loss.detach(), grads))
    (plain_logits, plain_loss, plain_grads), (packed_logits, packed_loss, packed_grads) = results
    for a, b in zip(plain_logits, packed_logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == packed_grads.keys() and "projector.0.weight" in plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Each sample's own loss, too (not just the sum).
    for k, sample in enumerate(samples):
        own = next_token_loss(plain_logits[k][None], sample["labels"][None])
        torch.testing.assert_close(next_token_loss(packed_logits[k][None], sample["labels"][None]), own)


def test_a_samples_logits_do_not_depend_on_its_pack_mates(tiny_backbones, tokenizer):
    model = build(tiny_backbones, tokenizer, "sdpa").eval()
    target = make_samples(model, seed=0)[2]
    n = len(target["input_ids"])
    seen = []
    with torch.no_grad():
        for mates in (make_samples(model, seed=1)[:2], make_samples(model, seed=2)[1:]):
            for row in ([*mates, target], [mates[0], target, mates[1]]):
                batch = collate_packed([row], tokenizer.pad_token_id)
                start = sum(len(s["input_ids"]) for s in row[: row.index(target)])
                seen.append(logits_of(model, batch)[0, start : start + n])
    for logits in seen[1:]:
        torch.testing.assert_close(logits, seen[0], rtol=1e-5, atol=1e-5)
    # Without the packed path the same row mixes samples: the check above can fail.
    row = [*make_samples(model, seed=1)[:2], target]
    batch = collate_packed([row], tokenizer.pad_token_id)
    start = sum(len(s["input_ids"]) for s in row[:2])
    with torch.no_grad():
        mixed = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits[
            0, start : start + n
        ]
    assert not torch.allclose(mixed, seen[0], atol=1e-3)


def test_packed_forward_refuses_attention_that_mixes_samples(tiny_backbones, tokenizer):
    model = build(tiny_backbones, tokenizer, "sdpa")
    model.language_model.config._attn_implementation = "flex_attention"
    batch = collate_packed([make_samples(model)[:2]], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="data.packing=true needs"):
        logits_of(model, batch)
