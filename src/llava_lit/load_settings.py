"""`LoadSettings`: how a checkpoint is loaded for inference, defined once for `predict`, `chat`, `serve` and `eval`.

Their configs include the `load` group (`conf/load/default.yaml`) at their root, and their settings dataclasses
inherit these fields, so `dtype=bfloat16`, `load_in_4bit=true`, `attn_implementation=sdpa` or `template=vicuna_v1`
mean the same on every command line. `inference.loading.load_for_inference` applies them. This module imports
nothing heavy, so a front end can name the settings without loading the model stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(kw_only=True)
class LoadSettings:
    """How a checkpoint is loaded for inference: the keys of `conf/load/default.yaml`, which `predict`, `chat`,
    `serve` and `eval` include, and the fields their settings dataclasses inherit."""

    dtype: str | None = None
    """Cast the model to this dtype (`bfloat16`, `float16`, `float32`); None keeps the checkpoint's. Under
    quantization it is the compute dtype of the quantized layers."""
    load_in_4bit: bool = False
    """Quantize the language model to 4-bit NF4 with bitsandbytes (projector and vision tower unquantized)."""
    load_in_8bit: bool = False
    """Quantize the language model to int8 with bitsandbytes."""
    attn_implementation: str | None = None
    """The language model's attention (`sdpa`, `eager`, `flash_attention_2`, ...); None keeps the one the
    checkpoint records (or transformers' choice)."""
    template: str | None = None
    """Chat template for a source that does not record one (official and llava-hf folders; default
    `vicuna_v1`); a template that disagrees with the one the source records is refused."""

    def load_settings(self) -> LoadSettings:
        """The load settings alone (of a front end's settings that inherit them)."""
        return LoadSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoadSettings)})
