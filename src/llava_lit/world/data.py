"""The miniature world's data module: the core `LlavaDataModule` over the world's shards, building the world first.

`prepare_data()` builds (or reuses) the world that `world` describes in `world_dir` when the module's sources lie
in it: shards, held-out questions and the tiny CLIP + LLaMA the `model=tiny` config loads. The training entry point calls it before it builds the
model, and Lightning again inside `fit` (then a cache hit); concurrent ranks serialise on `ensure_world`'s lock, so
the world is built once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from llava_lit.datamodule import LlavaDataModule
from llava_lit.world.build import ensure_world, load_world_info
from llava_lit.world.config import WorldConfig


def world_config(settings: Mapping[str, Any] | None) -> WorldConfig:
    """The `WorldConfig` of a `world` config node: `preset` (`default` or `ci`) plus `WorldConfig` field overrides."""
    values = dict(
        OmegaConf.to_container(settings, resolve=True) if OmegaConf.is_config(settings) else settings or {}
    )
    return WorldConfig.preset(values.pop("preset", "default"), **values)


class WorldDataModule(LlavaDataModule):
    """`LlavaDataModule` whose shards are a miniature world that `prepare_data()` builds when missing or stale."""

    def __init__(
        self, *args: Any, world_dir: str, world: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Args:
        world_dir: folder of the world (built there on first use; its `data/` holds the shards of `sources`).
        world: the world's settings, `{"preset": "default" | "ci", <WorldConfig field>: value, ...}`.
        Everything else as `LlavaDataModule`.
        """
        super().__init__(*args, **kwargs)
        self.world_dir = Path(world_dir)
        self.world_config = world_config(world)

    def reads_world(self) -> bool:
        """True when a training or validation source lies inside `world_dir` (the world's own shards).

        Runs that point the world's data entry at other shards (the tests' tiny datasets) need no world.
        """
        world = self.world_dir.expanduser().resolve()
        paths = [Path(spec["path"]).expanduser().resolve() for spec in [*self.source_specs, *self.val_specs]]
        return any(path.is_relative_to(world) for path in paths)

    def prepare_data(self) -> None:
        """Build the world into `world_dir` unless the one there has this config's fingerprint (or no source
        reads it); a world that reuses another's backbones (`backbones_from`) builds that one first if missing."""
        if not self.reads_world():
            return
        source = self.world_config.backbones_from
        if source and load_world_info(source) is None:  # the backbones' world, built at its default settings
            ensure_world(source, WorldConfig(seed=self.world_config.seed))
        ensure_world(self.world_dir, self.world_config)
