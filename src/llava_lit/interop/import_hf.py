"""Import transformers LLaVA and LLaVA-NeXT checkpoints (`llava-hf/*`, or our own exports) into llava_lit.

A LLaVA-NeXT folder (`model_type: llava_next`) becomes an AnyRes model (`model.anyres` from its
`image_grid_pinpoints`, unpad and newline on, `data.image_aspect: anyres`); its `image_newline` is our
`projector.image_newline` (`interop.llava_next`).

Two key layouts exist on the hub: the current one (transformers >= 4.52: `model.vision_tower.*`,
`model.multi_modal_projector.linear_{1,2}.*`, `model.language_model.*`, `lm_head.*`) and the older one that most
`llava-hf` repositories still hold (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`). Both map onto `LlavaModel` keys; the CLIP `vision_model.`
level is dropped because transformers 5's `CLIPVisionModel` is flat. This is the inverse of
`model.hf_interop.to_hf_llava_state_dict`, so llava_lit -> transformers -> llava_lit gives identical tensors.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, CLIPImageProcessor, LlavaConfig, LlavaNextConfig

from llava_lit.conversation import TEMPLATES, get_template
from llava_lit.interop.chat_template import system_prompt_of, to_jinja
from llava_lit.interop.checkpoint_files import read_state_dict
from llava_lit.interop.llava_next import HF_NEWLINE_KEYS, NEWLINE_KEY, check_hf_tile_size, checked_anyres
from llava_lit.interop.pretrained import PretrainedLlava, read_config_json, write_json
from llava_lit.model.llava import LlavaModelConfig
from llava_lit.tokenization import image_token_id, load_tokenizer

log = logging.getLogger(__name__)

_PREFIXES = (
    # (transformers prefix, LlavaModel prefix); the first match wins, so longer prefixes come first.
    *((key, NEWLINE_KEY) for key in HF_NEWLINE_KEYS),  # LLaVA-NeXT's row-end vector (whole key)
    ("model.vision_tower.", "vision_tower.backbone."),
    ("model.multi_modal_projector.linear_1.", "projector.0."),
    ("model.multi_modal_projector.linear_2.", "projector.2."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    # pre-4.52 layout
    ("vision_tower.", "vision_tower.backbone."),
    ("multi_modal_projector.linear_1.", "projector.0."),
    ("multi_modal_projector.linear_2.", "projector.2."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
)


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers LLaVA keys (either layout) -> `LlavaModel` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for theirs, ours in _PREFIXES:
            if key.startswith(theirs):
                rest = key[len(theirs) :]
                if ours.startswith("vision_tower."):
                    rest = rest.removeprefix("vision_model.")
                out[ours + rest] = value
                break
        else:
            raise ValueError(f"unexpected key in a transformers LLaVA checkpoint: {key!r}")
    return out


def _check_supported(config: LlavaConfig | LlavaNextConfig, folder: Path) -> None:
    """Refuse what llava_lit's model cannot reproduce, naming the field."""
    problems = []
    if isinstance(config, LlavaNextConfig) and config.vision_feature_select_strategy != "default":
        problems.append(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} with LLaVA-NeXT tiles "
            "(AnyRes lays out patch features only: 'default')"
        )
    if config.vision_config.model_type != "clip_vision_model":
        problems.append(
            f"vision tower {config.vision_config.model_type!r} (llava_lit loads HF towers as CLIP)"
        )
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer={config.vision_feature_layer!r} (several layers concatenated)")
    if config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act={config.projector_hidden_act!r} (mlp2x_gelu uses exact GELU)")
    if not config.multimodal_projector_bias:
        problems.append("multimodal_projector_bias=false (the projector's Linear layers have biases)")
    if problems:
        raise ValueError(f"{folder} cannot be represented by llava_lit's model: " + "; ".join(problems))


def _clip_processor(folder: Path, grid_pinpoints: list | None) -> tuple[CLIPImageProcessor, str]:
    """The folder's image processor as a `CLIPImageProcessor` (our towers' type) and its aspect mode.

    `grid_pinpoints`: the model config's, for a LLaVA-NeXT folder (its `LlavaNextImageProcessor` must tile with
    the same pinpoints, and one square tile size); None for LLaVA.
    """
    hf = AutoImageProcessor.from_pretrained(str(folder))
    size = dict(hf.size)
    crop = dict(hf.crop_size) if getattr(hf, "crop_size", None) else None
    if grid_pinpoints is not None:
        aspect = "anyres"
        check_hf_tile_size(hf, folder)
        tiled = getattr(hf, "image_grid_pinpoints", None)
        if tiled != grid_pinpoints:  # both read from JSON: lists of [height, width] lists
            raise ValueError(
                f"{folder}: the image processor tiles with image_grid_pinpoints {tiled!r:.120} but the model "
                f"config lays out {grid_pinpoints!r:.120}"
            )
    elif getattr(hf, "do_pad", False):
        aspect = "pad"
    elif not getattr(hf, "do_center_crop", True) and "height" in size:
        aspect = "resize"
        side = min(size["height"], size["width"])
        size, crop = {"shortest_edge": side}, {"height": size["height"], "width": size["width"]}
    else:
        aspect = "crop"
    processor = CLIPImageProcessor(
        size=size,
        crop_size=crop,
        resample=hf.resample,
        image_mean=list(hf.image_mean),
        image_std=list(hf.image_std),
        do_center_crop=True,
        do_rescale=bool(hf.do_rescale),
        rescale_factor=hf.rescale_factor,
        do_normalize=bool(hf.do_normalize),
    )
    return processor, aspect


def _recorded_template(tokenizer: Any) -> tuple[str | None, str | None]:
    """(name, system prompt) of our template whose Jinja equals the checkpoint's chat template (our exports).

    The system prompt is read back from the Jinja so that a run trained with `data.system_prompt` is recognised
    too; it is None when it is the template's own. (None, None) when no template of ours matches.
    """
    jinja = getattr(tokenizer, "chat_template", None)
    if not isinstance(jinja, str):
        return None, None
    system = system_prompt_of(jinja)
    for name, own in TEMPLATES.items():
        if jinja == to_jinja(get_template(name, system=system)):
            return name, None if system in (None, own.system) else system
    return None, None


def import_hf(folder: Path, workdir: Path, *, source: str) -> PretrainedLlava:
    """A transformers LLaVA or LLaVA-NeXT folder -> `PretrainedLlava` (backbone configs written under `workdir`)."""
    raw = read_config_json(folder / "config.json")  # plain data only, before transformers reads it
    next_model = raw.get("model_type") == "llava_next"
    config = (LlavaNextConfig if next_model else LlavaConfig).from_pretrained(str(folder))
    _check_supported(config, folder)
    tokenizer = load_tokenizer(str(folder))
    if image_token_id(tokenizer) != config.image_token_index:
        raise ValueError(
            f"{folder}: config.image_token_index={config.image_token_index} but the tokenizer's <image> id is "
            f"{image_token_id(tokenizer)}"
        )

    vision_dir = workdir / "vision"
    write_json(vision_dir / "config.json", config.vision_config.to_dict())
    anyres = (
        checked_anyres(config.image_grid_pinpoints, f"{folder}/config.json: image_grid_pinpoints")
        if next_model
        else None
    )
    processor, aspect = _clip_processor(folder, None if anyres is None else anyres.grid_pinpoints)
    processor.save_pretrained(str(vision_dir))
    llm_dir = workdir / "llm"
    text = config.text_config.to_dict()
    text.setdefault("architectures", [_causal_lm_class(text["model_type"])])
    write_json(llm_dir / "config.json", text)

    state = convert_hf_state_dict(read_state_dict(folder))
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if head not in state and config.text_config.tie_word_embeddings:
        state[head] = state[embed]  # tied: saved once
    template, system_prompt = _recorded_template(tokenizer)
    # config.json is data: its values are checked field by field, and the builder is fixed.
    model_config = LlavaModelConfig.from_data(
        {
            "vision_tower": {
                "name_or_path": str(vision_dir),
                "backend": "hf_clip",
                "feature_layer": config.vision_feature_layer,
                "select_feature": "patch"
                if config.vision_feature_select_strategy == "default"
                else "cls_patch",
                "pretrained": False,
            },
            "projector": "mlp2x_gelu",
            "language_model": {"name_or_path": str(llm_dir), "pretrained": False},
            "tokenizer_name_or_path": str(folder),
            **({} if anyres is None else {"anyres": dataclasses.asdict(anyres)}),
        },
        source=str(folder / "config.json"),
    )
    return PretrainedLlava(
        config=model_config,
        state_dict=state,
        pretrained_parts=(),
        kind="hf",
        source=source,
        template=template,
        system_prompt=system_prompt,
        image_aspect=aspect,
    )


def _causal_lm_class(model_type: str) -> str:
    """The `*ForCausalLM` class name transformers registers for `model_type`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"text model_type {model_type!r} has no causal-LM class in transformers")
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
