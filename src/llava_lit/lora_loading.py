"""Rebuilding a LoRA/QLoRA run's model from its adapter-only checkpoint, and writing its adapter in peft's format.

A LoRA checkpoint's `state_dict` holds the trained parameters only (adapters, projector, a trained tower). The frozen
base comes from what the run started from: `init_from` when the run config sets it, else the model config's
pretrained backbones. The model is rebuilt in full precision, the adapters added with the recorded settings and
loaded; for a QLoRA run the adapted base weights are first rounded through NF4 as training saw them
(`lora.round_through_nf4`). `merge=True` then folds the adapters in, leaving a plain `LlavaModel` that inference,
serving and the transformers export handle as any full finetune.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.lora import (
    add_adapters,
    load_trained_weights,
    merge_adapters,
    round_through_nf4,
    settings_of_run,
)
from llava_lit.model import LlavaModel, LlavaModelConfig
from llava_lit.tokenization import load_tokenizer

log = logging.getLogger(__name__)

MODULE_PREFIX = "model."
"""`LlavaLitModule` holds the `LlavaModel` as `self.model`, so checkpoint keys start with this."""


def is_lora_run(run_config: Mapping[str, Any]) -> bool:
    """Whether the run config records a LoRA run (its checkpoints hold the trained parameters only)."""
    return settings_of_run(run_config).enabled


def build_lora_model(
    run_config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    base: tuple[LlavaModel, PreTrainedTokenizerBase] | None = None,
    merge: bool = True,
) -> tuple[LlavaModel, PreTrainedTokenizerBase]:
    """The model of a LoRA checkpoint (`state_dict` with `model.` keys) and its tokenizer; see the module doc.

    `base` is the model the run started from when its run config sets `init_from` (the caller reads it with
    `checkpoint_reader.read_checkpoint`); otherwise the base is built from the run's model config.
    """
    settings = settings_of_run(run_config)
    init_from = run_config.get("init_from")
    if init_from:
        if base is None:
            raise ValueError(
                f"{source}: the LoRA run started from init_from={init_from}; pass its model as base"
            )
        log.info("%s: the LoRA base is init_from=%s", source, init_from)
        model, tokenizer = base
    else:
        config = LlavaModelConfig.from_data(run_config["model"], source=source)
        tokenizer = load_tokenizer(config.tokenizer_source, legacy=config.tokenizer_legacy)
        if not config.language_model.pretrained:
            raise ValueError(
                f"{source}: a LoRA run's base LLM must be pretrained weights (language_model.pretrained)"
            )
        model = config.build(tokenizer)
    state = {}
    for key, value in state_dict.items():
        if not key.startswith(MODULE_PREFIX):
            raise ValueError(f"{source}: unexpected state_dict key {key!r} (expected '{MODULE_PREFIX}...')")
        state[key[len(MODULE_PREFIX) :]] = value
    add_adapters(model, dataclasses.replace(settings, quantize=None))
    if settings.quantize is not None:
        count = round_through_nf4(model, settings)
        log.info(
            "%s: %d base weights rounded through %s, as the QLoRA run trained over them",
            source,
            count,
            settings.quantize,
        )
    load_trained_weights(model, state, source=source)
    if merge:
        merge_adapters(model)
    return model, tokenizer


def write_peft_adapter(model: LlavaModel, out: Path, *, base: str) -> list[Path]:
    """Write the adapters of `model` (unmerged) in peft's format (`adapter_config.json`, `adapter_model.safetensors`)
    with `base_model_name_or_path=base`, and the projector as `projector.safetensors` beside them."""
    from llava_lit.projector_io import write_projector

    language_model = model.language_model
    language_model.peft_config["default"].base_model_name_or_path = base
    language_model.save_pretrained(str(out))
    projector = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    write_projector(out / "projector.safetensors", projector, global_step=0)
    return sorted(out.iterdir())
