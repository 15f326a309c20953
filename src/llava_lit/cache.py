"""The llava_lit cache folder: the miniature world and the backbone configs of imported checkpoints live here.

`$LLAVA_LIT_CACHE` when set, else `~/.cache/llava_lit`. Python code calls `cache_dir()`; configs write
`${llava_lit_cache:}`, the OmegaConf resolver registered when `llava_lit` is imported, so the rule is written once.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CACHE_ENV = "LLAVA_LIT_CACHE"
"""The environment variable that moves the cache."""

RESOLVER = "llava_lit_cache"
"""The OmegaConf resolver name configs use: `${llava_lit_cache:}`."""


def cache_dir() -> Path:
    """The cache folder: `$LLAVA_LIT_CACHE`, else `~/.cache/llava_lit` (not created here)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "llava_lit"


def register_resolver() -> None:
    """Make `${llava_lit_cache:}` resolve to `cache_dir()` in every OmegaConf/Hydra config."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda: str(cache_dir()))
