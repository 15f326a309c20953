"""`python -m llava_lit.world [out_dir=DIR] [preset=default|ci] [force=true] [world.<field>=value ...]`: build the world.

A Hydra app (`conf/world_build.yaml` over the `BuildArgs` schema); `world` holds every `WorldConfig` field, and
the ones given on the command line apply on top of the preset, e.g.
`python -m llava_lit.world out_dir=/tmp/w preset=ci world.seed=3`. Without `force` a cached world with the same
config is reused. Prints the world's `world.json` summary (timings, backbone quality) at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from llava_lit.hydra_app import hydra_app
from llava_lit.world.build import build_world, ensure_world, load_world_info
from llava_lit.world.config import WorldConfig


@dataclass
class BuildArgs:
    """Command-line settings of a world build."""

    out_dir: str = "world"
    """Where the world goes (`conf/world_build.yaml` sets the training configs' default `paths.world_dir`)."""

    preset: str = "default"
    """`default` (the full world) or `ci` (the miniature preset for tests/CI); `world.*` overrides apply on top."""

    force: bool = False
    """Rebuild even if a world with the same config fingerprint is already there."""

    world: WorldConfig = field(default_factory=WorldConfig)
    """`WorldConfig` fields; only those given on the command line override the preset."""


ConfigStore.instance().store(name="world_build_schema", node=BuildArgs)


def given_world_fields(overrides: list[str]) -> set[str]:
    """The `WorldConfig` fields a list of command-line overrides sets: `world.seed=3` -> `seed`."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides)
    return {key.split(".")[1] for key in keys if key.startswith("world.")}


def build(args: DictConfig, world_fields: set[str]) -> Path:
    """Build or reuse the world `args` describe (`world_fields`: the fields set over the preset); return its folder."""
    values = OmegaConf.to_container(args.world, resolve=True)
    overrides = {name: values[name] for name in world_fields}
    try:
        cfg = WorldConfig.preset(args.preset, **overrides)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    out = Path(str(args.out_dir)).expanduser()
    out = build_world(cfg, out) if args.force else ensure_world(out, cfg)
    info = load_world_info(out)
    summary = {k: info[k] for k in ("fingerprint", "num_image_tokens", "counts", "timings_s", "metrics")}
    print(json.dumps(summary, indent=2))
    return out


@hydra_app("world_build", schemas={"": BuildArgs})
def main(args: DictConfig) -> None:
    """Hydra entry point; see `conf/world_build.yaml`."""
    build(args, given_world_fields(list(HydraConfig.get().overrides.task)))


if __name__ == "__main__":
    main()
