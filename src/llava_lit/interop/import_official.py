"""Import checkpoints of the official LLaVA code (haotian-liu/LLaVA): full releases and stage-1 projectors.

Official key layout (`LlavaLlamaForCausalLM`): the projector under `model.mm_projector.{0,2}.*` (or
`model.mm_projector.*` for `linear`), the LLaMA decoder under `model.*`, the head as `lm_head.weight`, and, only in
checkpoints that trained or saved the tower, CLIP under `model.vision_tower.vision_tower.vision_model.*`. Released
v1.5 checkpoints omit the tower and name its CLIP checkpoint in `config.json: mm_vision_tower`; the tower is then
loaded from that checkpoint. `config.json` is a `LlamaConfig` plus the `mm_*` fields that describe the rest.

LLaVA-1.6 releases (`image_aspect_ratio: anyres`, `mm_patch_merge_type: spatial_unpad`, `image_grid_pinpoints`)
become an AnyRes model (`interop.llava_next.official_anyres`); their `model.image_newline` weight is our
`projector.image_newline`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from llava_lit.interop.checkpoint_files import read_state_dict
from llava_lit.interop.llava_next import NEWLINE_KEY, OFFICIAL_NEWLINE_KEY, official_anyres
from llava_lit.interop.pretrained import PretrainedLlava, read_config_json, write_json
from llava_lit.model.llava import LlavaModelConfig
from llava_lit.projector_io import read_projector_weights

log = logging.getLogger(__name__)

PROJECTOR_PREFIX = "model.mm_projector."
VISION_PREFIX = "model.vision_tower.vision_tower."
IMAGE_ASPECTS = {"pad": "pad", "square": "crop", "resize": "resize"}
"""Official `image_aspect_ratio` -> our `data.image_aspect` (`square`, the default, is CLIP's centre crop)."""

_OFFICIAL_ONLY_FIELDS = (
    "mm_vision_tower",
    "mm_hidden_size",
    "mm_projector_type",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "mm_patch_merge_type",
    "mm_projector_lr",
    "mm_vision_tower_lr",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "vision_tower",
    "_name_or_path",
    "architectures",
    "auto_map",
    "transformers_version",
)


def _check_supported(config: dict[str, Any], folder: Path) -> None:
    """Refuse what llava_lit's model cannot reproduce, naming the field."""
    if config.get("mm_use_im_start_end"):
        raise ValueError(
            f"{folder}: mm_use_im_start_end=true (image start/end tokens) is not supported by llava_lit"
        )
    model_type = config.get("model_type", "llava_llama")
    if model_type not in ("llava_llama", "llava_mistral"):
        raise ValueError(
            f"{folder}: official model_type {model_type!r} is not supported (llava_llama, llava_mistral)"
        )


def language_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The plain LLM config inside an official `config.json` (`llava_llama` -> `llama`)."""
    lm = {k: v for k, v in config.items() if k not in _OFFICIAL_ONLY_FIELDS}
    base = config.get("model_type", "llava_llama").removeprefix("llava_")
    lm["model_type"] = base
    lm["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[base]]
    return lm


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official keys -> `LlavaModel` keys; returns the new dict and notes about dropped tensors."""
    out: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer recomputed from the config; old transformers versions saved it
        if key == OFFICIAL_NEWLINE_KEY:
            out[NEWLINE_KEY] = value  # LLaVA-1.6's row-end vector: a projector weight here
        elif key.startswith(PROJECTOR_PREFIX):
            out["projector." + key[len(PROJECTOR_PREFIX) :]] = value
        elif key.startswith(VISION_PREFIX):
            name = key[len(VISION_PREFIX) :].removeprefix("vision_model.")  # transformers 5 CLIP is flattened
            out["vision_tower.backbone." + name] = value
        elif key.startswith("model."):
            out["language_model." + key] = value
        elif key.startswith("lm_head."):
            out["language_model." + key] = value
        else:
            raise ValueError(f"unexpected key in an official LLaVA checkpoint: {key!r}")
    dropped = len(state) - len(out)
    if dropped:
        notes.append(f"dropped {dropped} rotary inv_freq buffers")
    return out, notes


def import_official(
    folder: Path, workdir: Path, *, source: str, projector_file: Path | None = None
) -> PretrainedLlava:
    """An official full checkpoint folder, or its stage-1 folder (`config.json` + `mm_projector.bin`)."""
    config_path = folder / "config.json"
    config = read_config_json(config_path)  # plain data only: a target or interpolation anywhere is refused
    _check_supported(config, folder)
    anyres = official_anyres(config, folder)  # None: one view per image
    if "mm_vision_tower" not in config:
        raise ValueError(
            f"{folder}/config.json has no mm_vision_tower: the CLIP tower it was trained with is unknown"
        )
    projector = config.get("mm_projector_type", "linear")  # the official default (LLaVA v1)
    aspect_ratio = config.get("image_aspect_ratio", "square")
    aspect = (
        "anyres"
        if anyres is not None
        else IMAGE_ASPECTS.get(aspect_ratio)
        if isinstance(aspect_ratio, str)
        else None
    )
    if aspect is None:
        raise ValueError(
            f"{folder}: image_aspect_ratio {config.get('image_aspect_ratio')!r} is not supported"
        )

    stage1 = projector_file is not None or not any(
        (folder / n).exists()
        for n in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )
    vision_node: dict[str, Any] = {
        "name_or_path": config["mm_vision_tower"],
        "backend": "hf_clip",
        "feature_layer": config.get("mm_vision_select_layer", -1),
        "select_feature": config.get("mm_vision_select_feature", "patch"),
    }
    notes: list[str] = []
    if stage1 and anyres is not None:
        raise ValueError(
            f"{folder}: a stage-1 projector of an anyres run: its mm_projector.bin does not hold the LLaVA-1.6 "
            "model.image_newline weight, so the AnyRes model cannot be built from it"
        )
    if stage1:
        # The LLM is the base model the projector was trained against (`_name_or_path` of the stage-1 run).
        projector_path = projector_file or folder / "mm_projector.bin"
        state = {"projector." + k: v for k, v in read_projector_weights(projector_path).items()}
        base_llm = config.get("_name_or_path")
        if not base_llm:
            raise ValueError(
                f"{folder}/config.json has no _name_or_path: the base LLM of the projector is unknown"
            )
        lm_node = {"name_or_path": base_llm, "pretrained": True}
        tokenizer = base_llm
        kind = "official_projector"
        vision_node["pretrained"] = True
    else:
        state, notes = convert_official_state_dict(read_state_dict(folder))
        has_tower = any(k.startswith("vision_tower.") for k in state)
        # With the tower's weights in the checkpoint only its architecture is needed from mm_vision_tower.
        vision_node["pretrained"] = not has_tower
        llm_dir = workdir / "llm"
        write_json(llm_dir / "config.json", language_model_config(config))
        lm_node = {"name_or_path": str(llm_dir), "pretrained": False}
        tokenizer = str(folder)
        kind = "official"
    # config.json is data: its values are checked field by field, and the builder is fixed.
    model_config = LlavaModelConfig.from_data(
        {
            "vision_tower": vision_node,
            "projector": projector,
            "language_model": lm_node,
            "tokenizer_name_or_path": tokenizer,
            **({} if anyres is None else {"anyres": dataclasses.asdict(anyres)}),
        },
        source=str(config_path),
    )
    return PretrainedLlava(
        config=model_config,
        state_dict=state,
        pretrained_parts=(
            ("vision_tower.", "language_model.")
            if stage1
            else ("vision_tower.",)
            if vision_node["pretrained"]
            else ()
        ),
        kind=kind,
        source=source,
        template=None,  # official checkpoints do not record their conversation template
        image_aspect=aspect,
        notes=notes,
    )
