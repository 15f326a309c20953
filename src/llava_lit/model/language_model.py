"""The language model: any `AutoModelForCausalLM`, loaded from a hub id or local folder, or built from a config.

Its embedding matrix is grown to cover tokens the tokenizer added (`<image>`, `<pad>`), padded to a multiple of 64
as llava-hf does (32002 -> 32064) for tensor-core-friendly shapes, with new rows set to the mean of the existing
ones so the added tokens start as an "average" token rather than noise.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from llava_lit.model.dtypes import parse_dtype


@dataclass
class LanguageModelConfig:
    """How to build the language model."""

    name_or_path: str
    """Hub id (e.g. `lmsys/vicuna-7b-v1.5`) or local folder of a causal LM checkpoint; also where the tokenizer is
    loaded from unless the model config sets `tokenizer_name_or_path`."""

    pretrained: bool = True
    """Load pretrained weights. False builds the architecture with random init (from `config_path` if set)."""

    config_path: str | None = None
    """A JSON file with the model's HF config (`config.json` format). When set, the architecture comes from this
    file instead of `name_or_path`'s config; used for building real-size models on the meta device."""

    dtype: str | None = "float32"
    """Parameter dtype (`float32`, `bfloat16`, `float16`). float32 suits mixed-precision training; None lets
    transformers choose."""

    attn_implementation: str | None = None
    """`sdpa`, `flash_attention_2`, `eager`, ...; None lets transformers choose."""

    pad_vocab_to_multiple_of: int = 64
    """When the embedding matrix is grown for added tokens, round its size up to this multiple."""


def load_config(cfg: LanguageModelConfig) -> PretrainedConfig:
    """The HF config of the language model: from `config_path` if set, else from `name_or_path`."""
    if cfg.config_path is not None:
        config_dict = PretrainedConfig.get_config_dict(cfg.config_path)[0]
        return AutoConfig.for_model(**config_dict)
    return AutoConfig.from_pretrained(cfg.name_or_path)


def build_language_model(
    cfg: LanguageModelConfig | dict[str, Any],
    *,
    on_meta: bool = False,
    empty_weights: bool = False,
    quantization: dict[str, Any] | None = None,
    quantized_device: str = "cpu",
) -> PreTrainedModel:
    """Build (and load, unless `on_meta`, `empty_weights` or not `pretrained`) the causal LM described by `cfg`.

    With `on_meta` the caller has entered `torch.device("meta")`: only the architecture is built. With
    `empty_weights` the parameters are left on the meta device (no memory, no random init) while buffers such as
    the rotary frequencies are real: the caller assigns the weights (`load_state_dict(..., assign=True)`).
    `quantization` (the arguments of transformers' `BitsAndBytesConfig`, from `lora.quantization_arguments`) loads
    the pretrained weights quantized onto `quantized_device`, where bitsandbytes quantizes them.
    """
    if isinstance(cfg, dict):
        cfg = LanguageModelConfig(**cfg)
    config = load_config(cfg)
    dtype = parse_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        if on_meta or empty_weights or not cfg.pretrained:
            raise ValueError(
                "a quantized language model is loaded from pretrained weights: set language_model.pretrained=true "
                "and build off the meta device"
            )
        return AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            config=config,
            dtype=dtype if dtype is not None else "auto",
            quantization_config=BitsAndBytesConfig(**quantization),
            device_map={"": quantized_device},
            **kwargs,
        )
    if cfg.pretrained and not on_meta and not empty_weights:
        return AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, config=config, dtype=dtype if dtype is not None else "auto", **kwargs
        )
    with init_empty_weights(include_buffers=False) if empty_weights else nullcontext():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if dtype is not None:
        model.to(dtype)
    return model


def resize_embeddings_for_tokenizer(
    model: PreTrainedModel, num_tokens: int, pad_to_multiple_of: int = 64
) -> bool:
    """Grow the input (and untied output) embeddings to hold `num_tokens`, mean-initialising the new rows.

    Never shrinks: a checkpoint with spare rows (e.g. llava-hf's 32064) keeps them. Returns whether it resized.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if num_tokens <= old:
        return False
    # transformers' own `mean_resizing` samples from a Gaussian fitted with the full covariance (slow at 4096
    # wide and not exactly the mean), so resize without it and fill the rows here.
    model.resize_token_embeddings(num_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    with torch.no_grad():
        for weight in weights:
            if weight.is_meta:
                continue
            weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)
    return True
