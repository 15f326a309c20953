"""Fixtures for the model tests: the tiny backbones' tokenizer with LLaVA's added tokens, and a tiny LlavaModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.model import LlavaModel, build_llava
from llava_lit.tokenization import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tiny_backbones: Path) -> PreTrainedTokenizerBase:
    """The tiny LLM's 32k LLaMA tokenizer with `<image>` and `<pad>` added by the project's loader (32002 tokens)."""
    return load_tokenizer(str(tiny_backbones / "llm"))


@pytest.fixture
def build_tiny(tiny_backbones: Path, tokenizer: PreTrainedTokenizerBase):
    """Factory for a tiny LlavaModel over the saved tiny CLIP + LLaMA; keyword overrides go to the tower config."""

    def build(projector: str = "mlp2x_gelu", **tower_overrides) -> LlavaModel:
        torch.manual_seed(0)
        return build_llava(
            vision_tower={"name_or_path": str(tiny_backbones / "clip"), **tower_overrides},
            projector=projector,
            language_model={"name_or_path": str(tiny_backbones / "llm")},
            tokenizer=tokenizer,
        )

    return build


@pytest.fixture
def tiny_llava(build_tiny) -> LlavaModel:
    """A tiny LLaVA-1.5-shaped model (frozen CLIP 56 px -> mlp2x_gelu -> tiny LLaMA), in eval mode."""
    return build_tiny().eval()


@pytest.fixture(scope="session")
def image_row():
    """Builds token ids `before + (n_images image runs, separated by a text token) + after` for a model."""

    def build(model: LlavaModel, before: list[int], after: list[int], n_images: int = 1) -> list[int]:
        run = [model.image_token_id] * model.num_image_tokens
        ids = list(before)
        for k in range(n_images):
            if k:
                ids.append(13)  # a text token between consecutive images
            ids += run
        return ids + list(after)

    return build
