"""Fixtures of the world tests: a miniature world built once per session with the CI preset (fewer steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_lit.world.config import WorldConfig


@pytest.fixture(scope="session")
def tiny_world_cfg() -> WorldConfig:
    """The CI preset, shortened further: the tests check formats and loading, not backbone quality."""
    return WorldConfig.ci(n_train_scenes=150, n_val_scenes=20, n_eval_scenes=40, clip_steps=6, llm_steps=6)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory, tiny_world_cfg: WorldConfig) -> Path:
    """A built world folder (see `llava_lit.world.build` for the layout)."""
    from llava_lit.world.build import ensure_world

    return ensure_world(tmp_path_factory.mktemp("world") / "w", tiny_world_cfg)
