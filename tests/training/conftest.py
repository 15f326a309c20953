"""Fixtures for training tests: a small LLaVA-format dataset converted to shards with the project's converter,
and a composer that returns the real `conf/train.yaml` shrunk to the tiny backbones and that data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image, ImageDraw

from llava_lit.convert import convert

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
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
        "callbacks=default",  # the finetune stage's sample answers read the miniature world's eval files
        "module.compile_blocks=false",  # compiling costs ~20 s a run; test_train covers it once
    ]


@pytest.fixture()
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
