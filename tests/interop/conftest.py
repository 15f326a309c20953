"""Fixtures for the interop tests: a tiny random LLaVA built from the shared tiny backbones, and a test image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def model_node(tiny_backbones: Path, projector: str = "mlp2x_gelu") -> dict:
    """The `model` config node of a tiny LLaVA over the shared backbones."""
    return {
        "_target_": "llava_lit.model.build_llava",
        "vision_tower": {"name_or_path": str(tiny_backbones / "clip")},
        "projector": projector,
        "language_model": {"name_or_path": str(tiny_backbones / "llm")},
        "tokenizer_name_or_path": str(tiny_backbones / "llm"),
    }


def build_tiny(tiny_backbones: Path, tokenizer, projector: str = "mlp2x_gelu", seed: int = 0):
    """A tiny `LlavaModel`; the projector is seeded, the backbones come from the fixture's checkpoints."""
    from llava_lit.model import build_llava

    torch.manual_seed(seed)
    node = {k: v for k, v in model_node(tiny_backbones, projector).items() if k != "_target_"}
    return build_llava(**node, tokenizer=tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_run_config(tiny_backbones: Path) -> dict:
    """A resolved run config as training stores it (`checkpoint["llava_lit_config"]`) for the tiny model."""
    return {
        "model": model_node(tiny_backbones),
        "data": {"template": "vicuna_v1", "image_aspect": "pad", "max_length": 256},
        "stage": {"name": "finetune", "train_vision_tower": False},
        "run_name": "tiny",
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-5},
        "global_batch_size": 8,
    }


@pytest.fixture(scope="session")
def make_tiny(tiny_backbones: Path, llama_tokenizer):
    """`make_tiny(projector="mlp2x_gelu", seed=0)` -> a fresh tiny `LlavaModel`."""

    def make(projector: str = "mlp2x_gelu", seed: int = 0):
        return build_tiny(tiny_backbones, llama_tokenizer, projector, seed)

    return make


@pytest.fixture(scope="module")
def tiny_llava(tiny_backbones: Path, llama_tokenizer):
    """A tiny LLaVA with an `mlp2x_gelu` projector (transformers-representable)."""
    return build_tiny(tiny_backbones, llama_tokenizer)


@pytest.fixture(scope="module")
def exported(tiny_llava, llama_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_llava` exported to a transformers folder (vicuna_v1 template, images padded to square)."""
    from llava_lit.interop.export_hf import export_hf_llava

    return export_hf_llava(
        tiny_llava,
        llama_tokenizer,
        tmp_path_factory.mktemp("hf_export"),
        template="vicuna_v1",
        image_aspect="pad",
    )


@pytest.fixture(scope="session")
def wide_image() -> Image.Image:
    """A non-square 90x60 RGB picture (coloured gradients and a disc), so padding to square matters."""
    y, x = np.mgrid[0:60, 0:90]
    rgb = np.stack([x * 255 // 89, y * 255 // 59, ((x - 45) ** 2 + (y - 30) ** 2 < 400) * 200], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))
