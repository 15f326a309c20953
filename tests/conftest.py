"""Fixtures shared by every test: an offline environment and small real-format backbones built on the spot.

Nothing here downloads. The LLaMA-style tokenizer is the 32k sentencepiece model that `mistral-common` ships;
the vision tower and LLM are random-init tiny configs saved with `save_pretrained`, so tests exercise the same
`from_pretrained` loading code as a real checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Set before transformers/huggingface_hub are imported anywhere: without them a missing model retries the
# hub for ~25 s instead of failing at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` where no CUDA device is visible (they run on GPU machines)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a real LLaMA-style 32k sentencepiece `tokenizer.model` (BOS 1, EOS 2, UNK 0)."""
    import mistral_common

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    out = tmp_path_factory.mktemp("llama_tokenizer")
    shutil.copy(src, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir: Path):
    """The 32k LLaMA tokenizer, with `<image>` and `<pad>` added by the project's own loader."""
    from llava_lit.tokenization import load_tokenizer

    return load_tokenizer(str(llama_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory, llama_tokenizer_dir: Path) -> Path:
    """Random-init tiny CLIP vision tower (+ its image processor) and tiny LLaMA (+ tokenizer), saved in HF format.

    Layout: `<root>/clip` (CLIPVisionModel, 56 px, patch 14 -> 16 image tokens) and `<root>/llm`
    (LlamaForCausalLM with the 32k tokenizer's vocabulary).
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("tiny_backbones")
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        projection_dim=32,
    )
    CLIPVisionModel(vcfg).save_pretrained(root / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
    ).save_pretrained(root / "clip")
    lcfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(lcfg).save_pretrained(root / "llm")
    shutil.copy(llama_tokenizer_dir / "tokenizer.model", root / "llm" / "tokenizer.model")
    return root


@pytest.fixture(scope="session")
def trained_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded default: the miniature world built, then `align` and `finetune` run through the real
    `conf/train.yaml` (what `make demo` does, minus the no-stage-1 ablation). Takes several minutes.

    Returns `world` (the world folder), `outputs` (the output root), `align`/`finetune` (their last
    checkpoints) and `overrides` (the command-line overrides that reproduce these runs).
    """
    from llava_lit.train import train
    from llava_lit.world.evaluate import compose_train

    root = tmp_path_factory.mktemp("default_world")
    # The default preset, not the `ci` one: the CI world's backbones are too small to learn from, and the point
    # of this fixture is a model that measurably learned.
    overrides = [
        f"paths.world_dir={root / 'world'}",
        "world.preset=default",
        f"paths.output_root={root / 'outputs'}",
    ]
    metrics = {stage: train(compose_train([*overrides, f"stage={stage}"])) for stage in ("align", "finetune")}
    runs = root / "outputs" / "world"
    return {
        "world": root / "world",
        "outputs": root / "outputs",
        "align": runs / "align" / "checkpoints" / "last.ckpt",
        "finetune": runs / "finetune" / "checkpoints" / "last.ckpt",
        "overrides": overrides,
        "metrics": metrics,
    }
