"""Batching of encoded samples: right padding, attention mask, labels padded with IGNORE_INDEX, image stacking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from llava_lit.constants import IGNORE_INDEX


def supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Targets the loss counts in `labels[B, L]`: the shifted labels (`labels[:, 1:]`) that are not ignored."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def collate(samples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack samples (`id`, `input_ids[L]`, `labels[L]`, `pixel_values[n,3,H,W] | None`) into one batch.

    Returns `ids`, `input_ids[B, Lmax]` (right-padded with `pad_token_id`), `attention_mask[B, Lmax]`,
    `labels[B, Lmax]` (padded with `IGNORE_INDEX`) and `pixel_values[N, 3, H, W]` holding every image in
    reading order, or None when no sample has one; AnyRes samples (with `image_sizes`) add `image_sizes[n, 2]`.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    input_ids = pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=pad_token_id)
    labels = pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX)
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])  # [B]
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()  # [B, Lmax]
    return {
        "ids": [s["id"] for s in samples],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        **_images(samples),
    }


def collate_packed(rows: Sequence[Sequence[dict[str, Any]]], pad_token_id: int) -> dict[str, Any]:
    """Lay each row's samples end to end into one batch row (see `llava_lit.packing`).

    Returns the keys of `collate` plus `position_ids[B, Lmax]`, which restart at 0 at each sample's first token
    (padding continues the row's last sample). `attention_mask` is 1 on every real token, 0 on padding. Each
    sample's first label is `IGNORE_INDEX`, so the single shift in `module.next_token_loss` never predicts a
    sample's first token from the previous sample's last one. `pixel_values` holds every image in the order its
    placeholder run appears, row by row, which is the order the model's splice fills the runs in.
    """
    if not rows or any(not row for row in rows):
        raise ValueError("cannot collate an empty row or an empty list of rows")
    lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
    max_len = max(lengths)
    input_ids = torch.full((len(rows), max_len), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), max_len), dtype=torch.long)
    position_ids = torch.zeros((len(rows), max_len), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            length = len(sample["input_ids"])
            input_ids[r, start : start + length] = sample["input_ids"]
            labels[r, start : start + length] = sample["labels"]
            labels[r, start] = IGNORE_INDEX  # the sample boundary: nothing predicts its first token
            position_ids[r, start : start + length] = torch.arange(length)
            start += length
        attention_mask[r, :start] = 1
        last = len(row[-1]["input_ids"])
        position_ids[r, start:] = torch.arange(last, last + max_len - start)
    samples = [s for row in rows for s in row]
    return {
        "ids": [s["id"] for s in samples],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
        **_images(samples),
    }


def _images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`pixel_values[N, 3, H, W]`: every sample's images (AnyRes: their tiles) in order, or None; with AnyRes also
    `image_sizes[n_images, 2]`, each image's (height, width)."""
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    out: dict[str, Any] = {"pixel_values": torch.cat(images, dim=0) if images else None}
    if any("image_sizes" in s for s in samples):
        sizes = [s["image_sizes"] for s in samples if s.get("image_sizes") is not None]
        out["image_sizes"] = torch.cat(sizes) if sizes else torch.zeros((0, 2), dtype=torch.long)
    return out
