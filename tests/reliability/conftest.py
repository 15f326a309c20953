"""Fixtures of the reliability tests, reused from the data and training tests: the LLaVA-format folder with
real photos (`llava_dataset`), the tiny tower's image processor, and the real training config shrunk to the
tiny backbones and shards (`compose_train`, `tiny_shards`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    """Import a conftest of another test folder under its own name (conftests are not importable packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_data = _load("reliability_data_fixtures", TESTS / "data" / "conftest.py")
_training = _load("reliability_training_fixtures", TESTS / "training" / "conftest.py")

build_llava_dataset = _data.build_llava_dataset
llava_dataset = _data.llava_dataset
clip_processor_56 = _data.clip_processor_56
tiny_shards = _training.tiny_shards
compose_train = _training.compose_train
