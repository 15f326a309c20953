"""Starting points from elsewhere: one entry that turns a checkpoint of any supported kind into our model.

`load_pretrained_llava(source)` accepts
- an official LLaVA checkpoint folder (`liuhaotian/llava-v1.5-7b` style: `model_type: llava_llama`, keys
  `model.mm_projector.*`, LLaMA keys under `model.*`, with or without `model.vision_tower.vision_tower.*`),
- an official stage-1 folder (`config.json` + `mm_projector.bin`, no LLM weights),
- an official LoRA folder (`llava-v1.5-7b-lora` layout: adapter + `non_lora_trainables.bin`), merged into its base,
- a transformers LLaVA folder (`llava-hf/*`, `model_type: llava`, current or pre-4.52 key layout),
- one of our training checkpoints (Lightning `.ckpt` file or FSDP2 directory),
- or a hub id of the first three (resolved through the local Hugging Face cache / hub).

It returns a `PretrainedLlava`: the model's settings (`LlavaModelConfig`, the same fields as `conf/model/*.yaml`)
and a state dict in `LlavaModel`'s key layout, plus what the source says about data handling (template, image
aspect). Backbone configs that the source only holds inside its own `config.json` are written as small standalone
folders under `workdir`, so the settings are an ordinary, reusable model config. Whatever a source's files say is
data: the settings are checked by `LlavaModelConfig.from_data` and built by fixed code, never instantiated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.model.llava import LlavaModel, LlavaModelConfig
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
    """Weights in `LlavaModel` key layout: every tensor except those under `pretrained_parts`."""
    pretrained_parts: tuple[str, ...]
    """Key prefixes (`vision_tower.`, `language_model.`) whose weights come from the pretrained backbones named in
    `config` instead of `state_dict`; empty when `state_dict` holds the whole model."""
    kind: str
    """`official`, `official_projector`, `official_lora`, `hf`, or `llava_lit`."""
    source: str
    """What was asked for."""
    template: str | None = None
    """The chat template the source was trained with, when it says so (`data.template`)."""
    system_prompt: str | None = None
    """The system prompt that replaced the template's in training (`data.system_prompt`); None = the template's."""
    image_aspect: str | None = None
    """The source's image handling (`pad`/`crop`/`resize`), when it says so (`data.image_aspect`)."""
    notes: list[str] = field(default_factory=list)
    """Conversions applied (dropped buffers, grown embeddings, ...), for the log."""

    def build(
        self, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[LlavaModel, PreTrainedTokenizerBase]:
        """Build the model from `config`, load the weights, and return it with its tokenizer."""
        if tokenizer is None:
            tokenizer = load_tokenizer(self.config.tokenizer_source, legacy=self.config.tokenizer_legacy)
        model = self.config.build(tokenizer)
        self.load_into(model)
        return model, tokenizer

    def load_into(self, model: LlavaModel) -> None:
        """Copy the weights into `model` (built from `config`), with a clear error when they do not fit.

        Embedding matrices with fewer rows than the model (a source without `<image>`/`<pad>` tokens) fill the
        missing rows with the mean of the given ones, as `resize_embeddings_for_tokenizer` does for a base LLM.
        """
        load_llava_weights(model, self.state_dict, pretrained_parts=self.pretrained_parts, source=self.source)


def load_llava_weights(
    model: LlavaModel,
    state: dict[str, torch.Tensor],
    *,
    pretrained_parts: tuple[str, ...] = (),
    source: str = "checkpoint",
) -> None:
    """Load `state` (LlavaModel keys) into `model`; every model tensor not under `pretrained_parts` must be there."""
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not k.startswith(pretrained_parts))
    if unexpected or missing:
        raise ValueError(
            f"{source} does not fit the model built from its config: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    with torch.no_grad():
        for key, value in state.items():
            target = own[key]
            if (
                key in EMBEDDING_KEYS
                and value.shape[0] < target.shape[0]
                and value.shape[1:] == target.shape[1:]
            ):
                rows = value.shape[0]
                target[:rows].copy_(value)
                target[rows:] = value.float().mean(dim=0).to(target.dtype)
                log.info(
                    "%s: %s grown from %d to %d rows (mean-initialised)", source, key, rows, target.shape[0]
                )
                continue
            if value.shape != target.shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}"
                )
            target.copy_(value)


def default_workdir(source: str) -> Path:
    """Where the backbone configs of an imported `source` are written (under the llava_lit cache)."""
    cache = Path(os.environ.get("LLAVA_LIT_CACHE", Path.home() / ".cache" / "llava_lit"))
    digest = hashlib.sha1(
        str(Path(source).resolve() if Path(source).exists() else source).encode()
    ).hexdigest()
    return cache / "imported" / digest[:16]


def resolve_source(source: str) -> Path:
    """A local path as is; otherwise a hub id, fetched into (or found in) the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise FileNotFoundError(f"{source} is neither an existing path nor a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source))


def load_pretrained_llava(source: str | Path, *, workdir: str | Path | None = None) -> PretrainedLlava:
    """Read `source` (see the module docstring) into a `PretrainedLlava`.

    Args:
        source: a local file or folder, or a hub id.
        workdir: where to write the backbone configs extracted from the source; default under the llava_lit cache
            (`$LLAVA_LIT_CACHE/imported/<hash of source>`).
    """
    from llava_lit.interop import import_hf, import_official

    source = str(source)
    path = resolve_source(source)
    work = Path(workdir) if workdir is not None else default_workdir(source)
    if (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (path / ".metadata").is_file()):
        return _from_training_checkpoint(path, source)
    if path.is_file():
        if path.suffix in (".bin", ".safetensors") and "projector" in path.name:
            if not (path.parent / "config.json").is_file():
                raise ValueError(
                    f"{path} is a projector-only file without the config.json of its run, so the vision tower and "
                    "LLM it belongs to are unknown: train from it with `init_projector=` and your model config"
                )
            return import_official.import_official(path.parent, work, source=source, projector_file=path)
        raise ValueError(f"{path}: not a file kind llava_lit imports (.ckpt, mm_projector.bin, or a folder)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{path} has no config.json: not an official LLaVA, llava-hf or llava_lit checkpoint"
        )
    config = read_config_json(config_path)
    from llava_lit.interop.import_lora import import_official_lora, is_official_lora

    if is_official_lora(path):  # official LoRA: adapter + non_lora_trainables.bin over a base LLM
        return import_official_lora(path, work, source=source)
    if config.get("model_type") == "llava":
        return import_hf.import_hf(path, work, source=source)
    if "mm_vision_tower" in config or str(config.get("model_type", "")).startswith("llava_"):
        return import_official.import_official(path, work, source=source)
    raise ValueError(
        f"{path}: model_type {config.get('model_type')!r} is neither transformers' 'llava' nor an official "
        "LLaVA 'llava_*' checkpoint (with mm_vision_tower)"
    )


def read_config_json(path: Path) -> dict[str, Any]:
    """A folder's `config.json`, refused unless it is a plain-data object (no `_target_`, no interpolation)."""
    config = check_plain_data(json.loads(path.read_text()), str(path))
    if not isinstance(config, dict):
        raise ConfigRefused(f"{path} holds a {type(config).__name__}, not a config object")
    return config


def _from_training_checkpoint(path: Path, source: str) -> PretrainedLlava:
    from llava_lit.inference.loading import load_for_inference

    bundle = load_for_inference(path)
    data = bundle.run_config.get("data") or {}
    return PretrainedLlava(
        config=LlavaModelConfig.from_data(bundle.run_config["model"], source=source),
        state_dict={k: v.detach().clone() for k, v in bundle.model.state_dict().items()},
        pretrained_parts=(),
        kind="llava_lit",
        source=source,
        template=data.get("template"),
        system_prompt=data.get("system_prompt"),
        image_aspect=data.get("image_aspect"),
    )


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
