"""Language model loading and embedding growth for the tokens the tokenizer added."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from llava_lit.model import build_language_model, resize_embeddings_for_tokenizer


def test_embeddings_grow_to_multiple_of_64_with_mean_rows(tiny_backbones: Path, tokenizer) -> None:
    lm = build_language_model({"name_or_path": str(tiny_backbones / "llm")})
    original = LlamaForCausalLM.from_pretrained(tiny_backbones / "llm")
    assert len(tokenizer) == 32002
    assert resize_embeddings_for_tokenizer(lm, len(tokenizer))
    for new, old in (
        (lm.get_input_embeddings(), original.get_input_embeddings()),
        (lm.lm_head, original.lm_head),
    ):
        assert new.weight.shape == (32064, 64)
        torch.testing.assert_close(new.weight[:32000], old.weight)
        mean = old.weight.mean(dim=0)
        torch.testing.assert_close(new.weight[32000:], mean.expand(64, -1))
    assert lm.config.vocab_size == 32064
    # Already large enough: untouched.
    assert not resize_embeddings_for_tokenizer(lm, 32010)
    assert lm.get_input_embeddings().weight.shape[0] == 32064


def test_dtype_and_attention_are_configurable(tiny_backbones: Path) -> None:
    lm = build_language_model(
        {"name_or_path": str(tiny_backbones / "llm"), "dtype": "bfloat16", "attn_implementation": "eager"}
    )
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert lm.config._attn_implementation == "eager"


def test_random_init_from_config_file(tiny_backbones: Path) -> None:
    lm = build_language_model(
        {
            "name_or_path": "unused",
            "pretrained": False,
            "config_path": str(tiny_backbones / "llm" / "config.json"),
        }
    )
    assert isinstance(lm, LlamaForCausalLM) and lm.config.hidden_size == 64
