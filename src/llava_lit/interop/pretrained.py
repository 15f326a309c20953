"""A model to start from, as `checkpoint_reader.read_checkpoint` returns it, and the one loader that builds it.

`PretrainedLlava` holds the model's settings (`LlavaModelConfig`, the same fields as `conf/model/*.yaml`), a state
dict in `LlavaModel`'s key layout, and what the source says about data handling (template, image aspect).
`PretrainedLlava.build` is the only place a model is made from checkpoint weights: every part whose weights the
state dict holds is built with its parameters on the meta device (no memory, no random init) and the state dict's
tensors become the parameters (`load_state_dict(..., assign=True)`), so a 7B model is held once, never as a
random-init model plus the checkpoint. Parts the state dict does not hold (`pretrained_parts`) load from their
pretrained backbone as in a normal build.

Whatever a source's files say is data: the settings are checked by `LlavaModelConfig.from_data` and built by fixed
code, never instantiated (`llava_lit.untrusted`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.model.llava import MODEL_PARTS, LlavaModel, LlavaModelConfig
from llava_lit.tokenization import load_tokenizer
from llava_lit.untrusted import ConfigRefused, check_plain_data

log = logging.getLogger(__name__)

EMBEDDING_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
"""Tensors whose row count follows the tokenizer (sources without `<image>`/`<pad>` have fewer rows)."""


@dataclass
class PretrainedLlava:
    """A model to start from: how to build it and the weights to load into it."""

    config: LlavaModelConfig
    """The model's settings (checked data: `LlavaModelConfig.from_data`)."""
    state_dict: dict[str, torch.Tensor]
    """Weights in `LlavaModel` key layout: every tensor except those under `pretrained_parts`. `build` makes these
    tensors the model's parameters (no copy), so the model and this dict share storage afterwards."""
    pretrained_parts: tuple[str, ...]
    """Key prefixes (`vision_tower.`, `language_model.`) whose weights come from the pretrained backbones named in
    `config` instead of `state_dict`; empty when `state_dict` holds the whole model."""
    kind: str
    """`official`, `official_projector`, `official_lora`, `hf`, or `llava_lit` (one of our training checkpoints)."""
    source: str
    """What was asked for."""
    template: str | None = None
    """The chat template the source was trained with, when it says so (`data.template`)."""
    system_prompt: str | None = None
    """The system prompt that replaced the template's in training (`data.system_prompt`); None = the template's."""
    image_aspect: str | None = None
    """The source's image handling (`pad`/`crop`/`resize`), when it says so (`data.image_aspect`)."""
    run_config: dict[str, Any] | None = None
    """For our training checkpoints: the stored run config, checked (`model` and the inference `data` settings);
    None for other sources."""
    notes: list[str] = field(default_factory=list)
    """Conversions applied (dropped buffers, grown embeddings, ...), for the log."""

    def build(
        self, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[LlavaModel, PreTrainedTokenizerBase]:
        """Build the model once, with the weights of `state_dict` as its parameters, and return it with its
        tokenizer (`tokenizer` or the one `config` names)."""
        if tokenizer is None:
            tokenizer = load_tokenizer(self.config.tokenizer_source, legacy=self.config.tokenizer_legacy)
        held = {part for part in MODEL_PARTS if not f"{part}.".startswith(self.pretrained_parts)}
        model = self.config.build(tokenizer, empty_weights=held)
        load_llava_weights(model, self.state_dict, pretrained_parts=self.pretrained_parts, source=self.source)
        return model, tokenizer

    def with_attention(self, attn_implementation: str | None) -> PretrainedLlava:
        """This source with the language model's attention implementation replaced (None keeps the recorded)."""
        if attn_implementation is None:
            return self
        lm = dataclasses.replace(self.config.language_model, attn_implementation=attn_implementation)
        return dataclasses.replace(self, config=dataclasses.replace(self.config, language_model=lm))


def load_llava_weights(
    model: LlavaModel,
    state: dict[str, torch.Tensor],
    *,
    pretrained_parts: tuple[str, ...] = (),
    source: str = "checkpoint",
) -> None:
    """Make the tensors of `state` (LlavaModel keys) the parameters and buffers of `model`, in place.

    Every model tensor not under `pretrained_parts` must be in `state`, with the model's shape. A tensor of the
    model's dtype is taken as is (`assign=True`: no copy); another dtype is converted once, tensor by tensor.
    Embedding matrices with fewer rows than the model (a source without `<image>`/`<pad>` tokens) get the missing
    rows set to the mean of the given ones, as `resize_embeddings_for_tokenizer` does for a base LLM. Parameters
    keep their `requires_grad`; tied input/output embeddings are tied again afterwards.
    """
    own = model.state_dict(keep_vars=True)
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not k.startswith(pretrained_parts))
    if unexpected or missing:
        raise ValueError(
            f"{source} does not fit the model built from its config: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    fitted: dict[str, torch.Tensor] = {}
    for key in list(state):
        value, target = state[key], own[key]
        if key in EMBEDDING_KEYS and value.shape[0] < target.shape[0] and value.shape[1:] == target.shape[1:]:
            rows = value.shape[0]
            grown = torch.empty(target.shape, dtype=target.dtype)
            grown[:rows] = value
            grown[rows:] = value.float().mean(dim=0).to(target.dtype)
            log.info("%s: %s grown from %d to %d rows (mean-initialised)", source, key, rows, target.shape[0])
            value = state[key] = grown
        elif value.shape != target.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}"
            )
        if value.dtype != target.dtype:
            value = state[key] = value.to(target.dtype)
        fitted[key] = value
    model.load_state_dict(fitted, strict=False, assign=True)
    language_model = model.language_model
    if getattr(language_model.config, "tie_word_embeddings", False):
        language_model.tie_weights()
    still_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise ValueError(f"{source}: no weights for {still_empty[:5]} ({len(still_empty)})")


def read_config_json(path: Path) -> dict[str, Any]:
    """A folder's `config.json`, refused unless it is a plain-data object (no `_target_`, no interpolation)."""
    config = check_plain_data(json.loads(path.read_text()), str(path))
    if not isinstance(config, dict):
        raise ConfigRefused(f"{path} holds a {type(config).__name__}, not a config object")
    return config


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
