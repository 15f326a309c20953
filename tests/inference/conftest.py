"""Fixtures for inference tests: a tiny random LLaVA saved as a real training checkpoint, and small real images.

The checkpoint has the layout `LlavaLitModule` writes (`state_dict` keys `model.*` plus `llava_lit_config`, the
resolved run config), so loading goes through exactly the path a trained model takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_helpers import png_bytes, save_checkpoint, tiny_run_config


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_backbones: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vicuna_v1 checkpoint file of the tiny model."""
    out = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    return save_checkpoint(out, tiny_run_config(tiny_backbones))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path):
    """The tiny checkpoint loaded for inference on the CPU."""
    from llava_lit.inference import load_for_inference

    return load_for_inference(tiny_checkpoint)


@pytest.fixture
def question_set(tmp_path: Path) -> tuple[Path, Path]:
    """An official question file with 5 questions (image ones, a text-only one, one corrupt image, one missing)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.png").write_bytes(png_bytes(i))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = [
        {"question_id": 0, "image": "img0.png", "text": "What is in the image?", "category": "a"},
        {"question_id": 1, "image": "img1.png", "text": "Describe the colors.", "category": "a"},
        {"question_id": "q2", "text": "What is two plus two?", "category": "text"},
        {"question_id": 3, "image": "broken.png", "text": "What is this?", "category": "b"},
        {"question_id": 4, "image": "missing.png", "text": "And this?", "category": "b"},
        {"question_id": 5, "image": "img2.png", "text": "Anything else?"},
    ]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions, images
