"""Fixtures shared by every test: an offline environment, small real-format backbones built on the spot, a small
LLaVA-format dataset converted to shards with the project's converter, and a composer that returns the real
`conf/train.yaml` shrunk to the tiny backbones and that data.

Nothing here downloads. The LLaMA-style tokenizer is the 32k sentencepiece model that `mistral-common` ships;
the vision tower and LLM are random-init tiny configs saved with `save_pretrained`, so tests exercise the same
`from_pretrained` loading code as a real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image, ImageDraw

from llava_lit.hydra_app import config_dir

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


CONF_DIR = str(config_dir())
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def _write_dataset(root: Path, n: int, *, finetune: bool) -> Path:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        img = Image.new("RGB", (64, 48), (240, 240, 240))
        ImageDraw.Draw(img).ellipse((20, 12, 40, 32), fill=COLORS[color])
        img.save(images / f"{i:03d}.png")
        if finetune and i % 5 == 4:  # some text-only samples
            conv = [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": f"{color}."}]
            records.append({"id": f"t{i}", "conversations": conv})
            continue
        if finetune:
            conv = [
                {"from": "human", "value": "<image>\nWhat color is the circle?"},
                {"from": "gpt", "value": f"The circle is {color}."},
                {"from": "human", "value": "Is it a square?"},
                {"from": "gpt", "value": "No, it is a circle."},
            ]
        else:
            conv = [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": f"a {color} circle"},
            ]
        records.append({"id": f"s{i}", "image": f"{i:03d}.png", "conversations": conv})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shard folders `align`, `finetune` and their `val_*` twins (32 train / 8 val samples each)."""
    from llava_lit.convert import convert

    root = tmp_path_factory.mktemp("tiny_shards")
    out = {}
    for stage in ("align", "finetune"):
        for split, n in ((stage, 32), (f"val_{stage}", 8)):
            src = _write_dataset(root / "src" / split, n, finetune=stage == "finetune")
            convert(src, src.parent / "images", root / split, samples_per_shard=8, progress=False)
            out[split] = root / split
    return out


def tiny_overrides(
    tiny_backbones: Path, tiny_shards: dict[str, Path], output_root: Path, stage: str
) -> list[str]:
    """Command-line overrides that shrink `conf/train.yaml` to the tiny backbones and shards."""
    return [
        f"stage={stage}",
        f"model.vision_tower.name_or_path={tiny_backbones / 'clip'}",
        f"model.language_model.name_or_path={tiny_backbones / 'llm'}",
        f"data.sources=[{{path: {tiny_shards[stage]}, weight: 1.0}}]",
        f"data.val_sources=[{{path: {tiny_shards['val_' + stage]}, weight: 1.0}}]",
        "data.num_workers=0",
        f"paths.output_root={output_root}",
        "global_batch_size=8",
        "micro_batch_size=4",
        "++callbacks.sample_answers=null",  # the world finetune's sample answers read the world's eval files
        "module.compile_blocks=false",  # compiling costs ~20 s a run; test_train covers it once
    ]


@pytest.fixture(scope="session")
def train_overrides(tiny_backbones: Path, tiny_shards: dict[str, Path]) -> Callable[[Path, str], list[str]]:
    """`tiny_overrides` bound to the tiny backbones and shards: `(output_root, stage) -> overrides`."""
    return lambda output_root, stage: tiny_overrides(tiny_backbones, tiny_shards, output_root, stage)


@pytest.fixture()
def compose_train(
    tiny_backbones: Path, tiny_shards: dict[str, Path], tmp_path: Path
) -> Callable[..., DictConfig]:
    """Compose `conf/train.yaml` with overrides, pointed at the tiny backbones and shards, outputs in tmp_path."""

    def _compose(*overrides: str, stage: str = "align") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    *tiny_overrides(tiny_backbones, tiny_shards, tmp_path / "outputs", stage),
                    *overrides,
                ],
                return_hydra_config=True,
            )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "outputs" / cfg.run_name / stage)
        HydraConfig().set_config(cfg)
        return cfg

    return _compose
