"""Parsing dtype names from configs, shared by the vision tower and language model builders."""

from __future__ import annotations

import torch


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Turn a config dtype string (`float32`, `bfloat16`, `float16`) into a torch dtype; None stays None."""
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
    return dtype
