"""Helpers shared by the inference tests: the tiny run config, checkpoint writing and small real images."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch


def tiny_run_config(backbones: Path, template: str = "vicuna_v1") -> dict[str, Any]:
    """A resolved run config for the tiny backbones, as training stores it in checkpoints."""
    return {
        "run_name": "tiny",
        "stage": {"name": "finetune", "train_vision_tower": False},
        "model": {
            "_target_": "llava_lit.model.build_llava",
            "_convert_": "all",
            "tokenizer_name_or_path": None,
            "projector": "mlp2x_gelu",
            "vision_tower": {
                "name_or_path": str(backbones / "clip"),
                "backend": "hf_clip",
                "pretrained": True,
            },
            "language_model": {
                "name_or_path": str(backbones / "llm"),
                "pretrained": True,
                "dtype": "float32",
            },
        },
        "data": {"template": template, "image_aspect": "pad", "max_length": 256},
    }


def save_checkpoint(path: Path, run_config: dict[str, Any], seed: int = 0) -> Path:
    """Build the model from `run_config` and save it as a Lightning-style checkpoint file."""
    from hydra.utils import instantiate

    from llava_lit.tokenization import load_tokenizer

    model_cfg = run_config["model"]
    tokenizer = load_tokenizer(model_cfg["language_model"]["name_or_path"])
    torch.manual_seed(seed)
    model = instantiate(model_cfg, tokenizer=tokenizer)
    # A larger-than-default projector init makes image features matter to the tiny LLM's outputs.
    with torch.no_grad():
        for param in model.projector.parameters():
            param.normal_(0.0, 0.5)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "llava_lit_config": run_config, "global_step": 1}, path)
    return path


def png_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small real PNG: a crop of a scikit-image sample photo, shifted by `seed`."""
    from PIL import Image
    from skimage import data

    photo = data.astronaut()  # [512, 512, 3] uint8
    x = (seed * 37) % (512 - size[0])
    y = (seed * 53) % (512 - size[1])
    buf = io.BytesIO()
    Image.fromarray(photo[y : y + size[1], x : x + size[0]]).save(buf, format="PNG")
    return buf.getvalue()
