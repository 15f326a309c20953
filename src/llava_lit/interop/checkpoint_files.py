"""Reading the weight files of a Hugging Face-style checkpoint folder into one CPU state dict.

Released checkpoints come as `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with an index, or the
older `pytorch_model*.bin` (official LLaVA releases). `.bin` files are read with `weights_only=True`: a checkpoint
from the internet can hold tensors, never code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (safetensors preferred), following an index when there is one."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(
        f"{folder} holds no model.safetensors, pytorch_model.bin or their sharded index: not a model checkpoint"
    )


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `folder`, by its saved key."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            part = load_file(str(path))
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        overlap = state.keys() & part.keys()
        if overlap:
            raise ValueError(f"{path} repeats keys of another shard: {sorted(overlap)[:5]}")
        state.update(part)
    return state
