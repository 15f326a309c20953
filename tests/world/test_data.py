"""The world's data module builds the world in `prepare_data()`, which `train.build_components` runs before it
builds the model that loads the world's backbones."""

from __future__ import annotations

import dataclasses

import pytest

from llava_lit.world.build import load_world_info
from llava_lit.world.config import WorldConfig
from llava_lit.world.data import WorldDataModule, world_config
from llava_lit.world.evaluate import compose_train


def test_world_config_takes_a_preset_and_field_overrides():
    assert world_config({"preset": "ci", "seed": 3}) == WorldConfig.ci(seed=3)
    assert world_config(None) == WorldConfig()


def test_a_world_data_module_over_other_shards_builds_no_world(tmp_path):
    world_dir = tmp_path / "world"
    elsewhere = WorldDataModule(
        [{"path": str(tmp_path / "shards"), "weight": 1.0}], world_dir=str(world_dir), world={"preset": "ci"}
    )
    elsewhere.prepare_data()
    assert not elsewhere.reads_world() and not world_dir.exists()
    inside = WorldDataModule(str(world_dir / "data" / "align"), world_dir=str(world_dir))
    assert inside.reads_world()


def _shrunk_overrides(cfg: WorldConfig) -> list[str]:
    """`world.*` overrides that compose `cfg` (the CI preset plus the fields where `cfg` differs from it)."""
    ci = WorldConfig.ci()
    fields = (f.name for f in dataclasses.fields(WorldConfig))
    return [
        "world.preset=ci",
        *(f"+world.{k}={getattr(cfg, k)}" for k in fields if getattr(cfg, k) != getattr(ci, k)),
    ]


def test_build_components_reuses_a_built_world(tiny_world, tiny_world_cfg, tmp_path):
    from llava_lit.train import build_components

    built = (tiny_world / "world.json").stat().st_mtime_ns
    cfg = compose_train(
        [f"paths.world_dir={tiny_world}", f"paths.output_root={tmp_path}", *_shrunk_overrides(tiny_world_cfg)]
    )
    module, datamodule = build_components(cfg)
    assert isinstance(datamodule, WorldDataModule)
    assert datamodule.world_config == tiny_world_cfg
    assert (tiny_world / "world.json").stat().st_mtime_ns == built
    assert module.model.vision_tower.num_image_tokens == tiny_world_cfg.num_image_tokens


@pytest.mark.slow
def test_build_components_builds_the_world_before_the_model(tmp_path, tiny_world_cfg):
    from llava_lit.train import build_components

    world_dir = tmp_path / "world"
    overrides = [
        f"paths.world_dir={world_dir}",
        f"paths.output_root={tmp_path / 'outputs'}",
        "stage=finetune",
        "init_projector=null",
        *_shrunk_overrides(tiny_world_cfg),
    ]
    cfg = compose_train(overrides)
    assert load_world_info(world_dir) is None
    module, datamodule = build_components(cfg)
    info = load_world_info(world_dir)
    assert isinstance(datamodule, WorldDataModule)
    assert info is not None and info["fingerprint"] == tiny_world_cfg.fingerprint()
    assert module.model.vision_tower.num_image_tokens == tiny_world_cfg.num_image_tokens
    datamodule.setup("fit")
    assert datamodule.num_train_samples > 0
    built = (world_dir / "world.json").stat().st_mtime_ns
    datamodule.prepare_data()  # Lightning's call inside fit: the world is reused, not rebuilt
    assert (world_dir / "world.json").stat().st_mtime_ns == built
