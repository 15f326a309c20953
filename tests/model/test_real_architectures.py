"""Real LLaVA v1 / v1.5 shapes built on the meta device from `conf/hf_configs` and `conf/model` (no download)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from llava_lit.hydra_app import config_dir
from llava_lit.model import LlavaModel, build_llava

CONF = config_dir()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# model yaml, vision config, LLM config, projector params, LLM params (vocab 32000 + 2 added -> 32064),
# image tokens, total range
CASES = [
    (
        "llava_v15_7b",
        "clip-vit-large-patch14-336",
        "vicuna-7b-v1.5",
        20_979_712,
        6_738_939_904,
        576,
        (7.05e9, 7.08e9),
    ),
    (
        "llava_v15_13b",
        "clip-vit-large-patch14-336",
        "vicuna-13b-v1.5",
        31_467_520,
        13_016_519_680,
        576,
        (13.3e9, 13.4e9),
    ),
    (
        "llava_v1_7b",
        "clip-vit-large-patch14",
        "vicuna-7b-v1.3",
        4_198_400,
        6_738_939_904,
        256,
        (7.03e9, 7.06e9),
    ),
    (
        "llava_v1_13b",
        "clip-vit-large-patch14",
        "vicuna-13b-v1.3",
        5_248_000,
        13_016_519_680,
        256,
        (13.3e9, 13.4e9),
    ),
]


@pytest.mark.parametrize(("yaml_name", "clip", "llm", "n_proj", "n_llm", "n_tokens", "total"), CASES)
def test_real_architecture_parameter_counts_on_meta(
    tokenizer: PreTrainedTokenizerBase,
    yaml_name: str,
    clip: str,
    llm: str,
    n_proj: int,
    n_llm: int,
    n_tokens: int,
    total: tuple[float, float],
) -> None:
    cfg = OmegaConf.load(CONF / "model" / f"{yaml_name}.yaml")
    # The yaml names hub checkpoints; point the architecture at the hand-written configs instead of downloading.
    cfg.vision_tower.config_path = str(CONF / "hf_configs" / f"{clip}.json")
    cfg.language_model.config_path = str(CONF / "hf_configs" / f"{llm}.json")
    kwargs = OmegaConf.to_container(cfg)
    assert kwargs.pop("_target_") == "llava_lit.model.build_llava"
    kwargs.pop("_convert_")
    model = build_llava(**kwargs, tokenizer=tokenizer, device="meta")
    assert isinstance(model, LlavaModel)
    assert all(p.is_meta for p in model.parameters())
    assert count(model.projector) == n_proj
    assert count(model.language_model) == n_llm
    assert model.language_model.get_input_embeddings().weight.shape[0] == 32064
    assert model.num_image_tokens == n_tokens
    assert model.vision_tower.hidden_size == 1024 and len(model.vision_tower.blocks) == 24
    assert len(model.decoder_layers) == (32 if "7b" in llm else 40)
    assert total[0] < count(model) < total[1]
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
