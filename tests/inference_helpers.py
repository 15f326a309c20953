"""Helpers shared by the inference tests: the tiny run config, checkpoint writing and small real images."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaTokenizer


def tiny_run_config(backbones: Path, template: str = "vicuna_v1") -> dict[str, Any]:
    """A resolved run config for the tiny backbones, as training stores it in checkpoints."""
    return {
        "run_name": "tiny",
        "stage": {"name": "finetune", "train_vision_tower": False},
        "model": {
            "_target_": "llava_lit.model.build_llava",
            "_convert_": "all",
            "tokenizer_name_or_path": None,
            "projector": "mlp2x_gelu",
            "vision_tower": {
                "name_or_path": str(backbones / "clip"),
                "backend": "hf_clip",
                "pretrained": True,
            },
            "language_model": {
                "name_or_path": str(backbones / "llm"),
                "pretrained": True,
                "dtype": "float32",
            },
        },
        "data": {"template": template, "image_aspect": "pad", "max_length": 256},
    }


def save_checkpoint(path: Path, run_config: dict[str, Any], seed: int = 0) -> Path:
    """Build the model from `run_config` and save it as a Lightning-style checkpoint file."""
    from hydra.utils import instantiate

    from llava_lit.tokenization import load_tokenizer

    model_cfg = run_config["model"]
    tokenizer = load_tokenizer(model_cfg["language_model"]["name_or_path"])
    torch.manual_seed(seed)
    model = instantiate(model_cfg, tokenizer=tokenizer)
    # A larger-than-default projector init makes image features matter to the tiny LLM's outputs.
    with torch.no_grad():
        for param in model.projector.parameters():
            param.normal_(0.0, 0.5)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "llava_lit_config": run_config, "global_step": 1}, path)
    return path


def png_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small real PNG: a crop of a scikit-image sample photo, shifted by `seed`."""
    from PIL import Image
    from skimage import data

    photo = data.astronaut()  # [512, 512, 3] uint8
    x = (seed * 37) % (512 - size[0])
    y = (seed * 53) % (512 - size[1])
    buf = io.BytesIO()
    Image.fromarray(photo[y : y + size[1], x : x + size[0]]).save(buf, format="PNG")
    return buf.getvalue()


BASE_VOCAB = 32000


def write_official(
    model,
    folder: Path,
    tiny_backbones: Path,
    llama_tokenizer_dir: Path,
    *,
    with_tower: bool,
    legacy: bool | None = False,
) -> Path:
    """Save `model` as the official code would (vocabulary without the added tokens), its tokenizer recording
    `legacy` in `tokenizer_config.json` as the LLaVA-1.5 releases do (`legacy: false`); None records nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.projector.state_dict().items():
        state[f"model.mm_projector.{key}"] = value
    for (
        key,
        value,
    ) in model.language_model.state_dict().items():  # model.layers.*, model.embed_tokens, lm_head
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            value = value[:BASE_VOCAB]  # official checkpoints never hold <image>/<pad> rows
        state[key] = value
    if with_tower:
        for key, value in model.vision_tower.backbone.state_dict().items():
            state[f"model.vision_tower.vision_tower.vision_model.{key}"] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = model.language_model.config.to_dict()
    config.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        vocab_size=BASE_VOCAB,
        mm_vision_tower=str(tiny_backbones / "clip"),
        mm_hidden_size=32,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        tokenizer_padding_side="right",
    )
    (folder / "config.json").write_text(json.dumps(config))
    LlamaTokenizer.from_pretrained(
        str(llama_tokenizer_dir), legacy=bool(legacy), add_bos_token=True
    ).save_pretrained(folder)
    if legacy is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    return folder
