"""Parity with transformers' `LlavaForConditionalGeneration` on the same weights, and decoding behaviour
(left padding, KV cache) that generation builds on."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache, LlavaForConditionalGeneration

from llava_lit.hydra_app import config_dir
from llava_lit.model import LlavaModel
from llava_lit.model.hf_interop import to_hf_llava_state_dict

CONF = config_dir()


def hf_copy(model: LlavaModel) -> LlavaForConditionalGeneration:
    config, state = to_hf_llava_state_dict(model)
    hf = LlavaForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return hf.eval()


def test_logits_match_transformers_llava_with_images_and_text_only_rows(
    tiny_llava: LlavaModel, image_row
) -> None:
    hf = hf_copy(tiny_llava)
    assert hf.config.image_token_id == tiny_llava.image_token_id
    assert hf.config.vision_feature_layer == -2 and hf.config.vision_feature_select_strategy == "default"
    image_ids = image_row(tiny_llava, [1, 319, 29901], [450, 338, 13])
    two_images = image_row(tiny_llava, [1], [13], n_images=2)
    width = max(len(image_ids), len(two_images))
    rows = [image_ids, [1, 450, 6635, 338, 263, 13], two_images]
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # right padding, as the collate does
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ours = tiny_llava(ids, mask, pixels).logits
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real])

    text = torch.tensor([[1, 450, 6635, 338, 263, 13]])
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_llava(text, torch.ones_like(text)).logits,
            hf(input_ids=text, attention_mask=torch.ones_like(text)).logits,
        )


def test_left_padded_row_matches_unpadded(tiny_llava: LlavaModel, image_row) -> None:
    row = image_row(tiny_llava, [1, 319], [450, 13])
    pad = 5
    ids = torch.tensor([[0] * pad + row, [1, 450, 6635] + [338] * (len(row) + pad - 3)])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        padded = tiny_llava(ids, mask, pixels).logits
        alone = tiny_llava(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), pixels).logits
    torch.testing.assert_close(padded[0, -1], alone[0, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[0, pad:], alone[0], rtol=1e-4, atol=1e-5)


def test_kv_cache_decoding_matches_full_forward(tiny_llava: LlavaModel, image_row) -> None:
    """Prefill a left-padded batch with images, then decode two text tokens with the cache."""
    row = image_row(tiny_llava, [1, 319], [450, 13])
    pad = 3
    prompt = torch.tensor([[0] * pad + row, [1, 450] + [338] * (len(row) + pad - 2)])
    mask = torch.ones_like(prompt)
    mask[0, :pad] = 0
    pixels = torch.randn(1, 3, 56, 56)
    steps = torch.tensor([[263, 29871], [6635, 13]])
    with torch.no_grad():
        cache = DynamicCache(config=tiny_llava.language_model.config)
        out = tiny_llava(prompt, mask, pixels, past_key_values=cache, use_cache=True)
        step_logits = []
        for k in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = tiny_llava(steps[:, k : k + 1], mask, past_key_values=out.cache, use_cache=True)
            step_logits.append(out.logits[:, -1])
        full = tiny_llava(torch.cat([prompt, steps], dim=1), mask, pixels).logits
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full[:, -2:], rtol=1e-4, atol=1e-5)


def test_tiny_yaml_instantiates_through_hydra(tiny_backbones: Path, tokenizer) -> None:
    root = OmegaConf.create(
        {"paths": {"world_dir": str(tiny_backbones)}, "model": OmegaConf.load(CONF / "model" / "tiny.yaml")}
    )
    assert root.model.tokenizer_name_or_path is None
    model = hydra.utils.instantiate(root.model, tokenizer=tokenizer)
    assert isinstance(model, LlavaModel)
    assert model.num_image_tokens == 16 and model.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.language_model.get_input_embeddings().weight.shape[0] == 32064


def test_default_position_ids_follow_attention_mask(tiny_llava: LlavaModel) -> None:
    """RoPE is relative, so logits alone cannot see wrong absolute positions: check what reaches the LLM."""
    seen = {}
    tiny_llava.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.update(position_ids=kwargs["position_ids"]), with_kwargs=True
    )
    ids = torch.tensor([[0, 0, 1, 450, 13], [1, 450, 6635, 338, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        tiny_llava(ids, mask)
    assert seen["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    # A decode step of one token after 5 cached positions continues from the mask's running count.
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        cache = tiny_llava(ids, mask, use_cache=True).cache
        tiny_llava(torch.tensor([[13], [13]]), step_mask, past_key_values=cache, use_cache=True)
    assert seen["position_ids"].tolist() == [[3], [5]]
