"""Mapping a `LlavaModel` onto transformers' `LlavaForConditionalGeneration` (config + state dict).

Exporting trained checkpoints to the transformers format builds on this, and the parity test uses it to prove
that our splice and forward compute exactly what transformers computes for the same weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaConfig

from llava_lit.model.llava import LlavaModel


def to_hf_llava_state_dict(model: LlavaModel) -> tuple[LlavaConfig, dict[str, torch.Tensor]]:
    """The `LlavaConfig` and state dict that load into `LlavaForConditionalGeneration` with identical outputs.

    Supported: an `hf_clip` vision tower and an `mlp2x_gelu` projector (the only projector transformers' LLaVA
    has: `linear_1`, GELU, `linear_2`). Anything else raises `ValueError`.
    """
    tower = model.vision_tower
    if tower.backend != "hf_clip":
        raise ValueError(f"transformers' LLaVA needs an HF CLIP vision tower, not a {tower.backend!r} one")
    proj = model.projector
    if not (
        isinstance(proj, nn.Sequential)
        and len(proj) == 3
        and isinstance(proj[0], nn.Linear)
        and isinstance(proj[1], nn.GELU)
        and proj[1].approximate == "none"
        and isinstance(proj[2], nn.Linear)
    ):
        raise ValueError(
            "transformers' LLaVA projector is Linear-GELU-Linear: only 'mlp2x_gelu' maps onto it"
        )

    lm = model.language_model
    text_config = lm.config
    config = LlavaConfig(
        vision_config=tower.backbone.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=tower.num_image_tokens,
        projector_hidden_act="gelu",  # transformers' "gelu" is the exact (erf) GELU, like nn.GELU()
        vision_feature_select_strategy="default" if tower.select_feature == "patch" else "full",
        vision_feature_layer=tower.feature_layer,
        multimodal_projector_bias=proj[0].bias is not None,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )

    state: dict[str, torch.Tensor] = {}
    for name, tensor in tower.backbone.state_dict().items():
        state[f"model.vision_tower.{name}"] = tensor
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for name, tensor in proj[int(ours)].state_dict().items():
            state[f"model.multi_modal_projector.{theirs}.{name}"] = tensor
    base_prefix = lm.base_model_prefix + "."
    for name, tensor in lm.state_dict().items():
        if name.startswith(base_prefix):
            state["model.language_model." + name[len(base_prefix) :]] = tensor
        else:  # the head(s) sit at the top level in transformers' LLaVA: `lm_head.weight`
            state[name] = tensor
    return config, state
