"""Fixtures of the reliability tests: the LLaVA-format folder with real photos (`llava_dataset`) and the tiny
tower's image processor come from the data tests' conftest (the training fixtures are in `tests/conftest.py`)."""

from __future__ import annotations

from data.conftest import clip_processor_56, llava_dataset

__all__ = ["clip_processor_56", "llava_dataset"]
