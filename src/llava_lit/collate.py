"""Batching of encoded samples: right padding, attention mask, labels padded with IGNORE_INDEX, image stacking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from llava_lit.constants import IGNORE_INDEX


def collate(samples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack samples (`id`, `input_ids[L]`, `labels[L]`, `pixel_values[n,3,H,W] | None`) into one batch.

    Returns `ids`, `input_ids[B, Lmax]` (right-padded with `pad_token_id`), `attention_mask[B, Lmax]`,
    `labels[B, Lmax]` (padded with `IGNORE_INDEX`) and `pixel_values[N, 3, H, W]` holding every image in
    reading order, or None when no sample has one.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    input_ids = pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=pad_token_id)
    labels = pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX)
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])  # [B]
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()  # [B, Lmax]
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    pixel_values = torch.cat(images, dim=0) if images else None  # [N, 3, H, W]
    return {
        "ids": [s["id"] for s in samples],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
    }
