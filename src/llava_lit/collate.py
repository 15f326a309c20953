"""Batching of encoded samples: right padding, attention mask, labels padded with IGNORE_INDEX, image stacking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llava_lit.constants import IGNORE_INDEX


def collate(samples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack samples (`id`, `input_ids[L]`, `labels[L]`, `pixel_values[n,3,H,W] | None`) into one batch.

    Returns `ids`, `input_ids[B, Lmax]` (right-padded with `pad_token_id`), `attention_mask[B, Lmax]`,
    `labels[B, Lmax]` (padded with `IGNORE_INDEX`) and `pixel_values[N, 3, H, W]` holding every image in
    reading order, or None when no sample has one.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch_size = len(samples)
    max_len = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((batch_size, max_len), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        input_ids[row, :length] = sample["input_ids"]
        labels[row, :length] = sample["labels"]
        attention_mask[row, :length] = 1
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    pixel_values = torch.cat(images, dim=0) if images else None  # [N, 3, H, W]
    return {
        "ids": [s["id"] for s in samples],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
    }
