"""`python -m llava_lit.world [out_dir=DIR] [preset=default|ci] [force=true] [world.<field>=value ...]`: build the world.

Arguments are OmegaConf dot-list overrides of `BuildArgs`, whose `world` is a `WorldConfig`; e.g.
`python -m llava_lit.world out_dir=/tmp/w preset=ci world.seed=3`. Without `force` a cached world with the same
config is reused. Prints the world's `world.json` summary (timings, backbone quality) at the end.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from llava_lit.world.build import WorldConfig, build_world, ensure_world, load_world_info


@dataclass
class BuildArgs:
    """Command-line settings of a world build."""

    out_dir: str = "${llava_lit_cache:}/world"
    """Where the world goes (the training configs' default `paths.world_dir`)."""

    preset: str = "default"
    """`default` (the full world) or `ci` (the miniature preset for tests/CI); `world.*` overrides apply on top."""

    force: bool = False
    """Rebuild even if a world with the same config fingerprint is already there."""

    world: dict = field(default_factory=dict)
    """Overrides of `WorldConfig` fields."""


def main(argv: list[str] | None = None) -> Path:
    """Parse `argv` (dot-list overrides), build or reuse the world, print its summary, return its folder."""
    args = OmegaConf.merge(
        OmegaConf.structured(BuildArgs), OmegaConf.from_dotlist(argv if argv is not None else sys.argv[1:])
    )
    overrides = OmegaConf.to_container(args.world, resolve=True)
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


if __name__ == "__main__":
    main()
