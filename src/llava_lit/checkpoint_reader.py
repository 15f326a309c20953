"""The one checkpoint reader: what a path is, and its model settings and weights as a `PretrainedLlava`.

`classify_checkpoint(path)` decides, from the path alone and small metadata files, which of the supported kinds
a path is (`CheckpointKind`); `read_checkpoint(source)` reads it. Every entry point that starts from weights goes
through these two (`train init_from=`, predict, chat, serve, eval, export), and `PretrainedLlava.build` is the one
loader that turns the result into a model, holding the weights once.

- a Lightning checkpoint file (`*.ckpt`): weights under `state_dict` as `model.<LlavaModel key>`, the resolved run
  config under `llava_lit_config`. It is memory-mapped, so the optimizer state beside the weights (twice the
  model's size) is never read into memory.
- an FSDP2 distributed-checkpoint directory (`.metadata`, shards, `meta.pt`): the run config comes from `meta.pt`
  and only the model's tensors are read from the shards (their shapes from `.metadata`).
- our exported folder (`python -m llava_lit.export`) and a llava-hf folder: transformers LLaVA or LLaVA-NeXT
  (`model_type: llava` / `llava_next`); an export is told apart by its model card's `llava_lit` tag.
- an official LLaVA folder (`model_type: llava_*` with `mm_vision_tower`), or its stage-1 projector
  (`mm_projector.bin` with the run's `config.json` beside it), or its LoRA folder (`llava-v1.5-7b-lora` layout:
  peft adapter + `non_lora_trainables.bin`), merged into its base LLM (`interop.import_lora`).

A LoRA run's own checkpoint holds only what trained (adapters, projector): its base is rebuilt from the run config
(or from its `init_from`, read here too) and the adapters are merged into it (`lora_loading`).
- a hub id (`owner/name`, not a local path) of the folder kinds, resolved through the Hugging Face cache / hub.

What a file says is data: a stored run config is checked field by field (`LlavaModelConfig.from_data`,
`checked_data_settings`) and a `config.json` as plain data (`read_config_json`); a checkpoint that names a
`_target_` is refused before any weight is read, and `.ckpt`/`.bin` files are read with `weights_only=True`.
"""

from __future__ import annotations

import copy
import enum
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.cache import cache_dir
from llava_lit.conversation import TEMPLATES
from llava_lit.images import ASPECT_MODES
from llava_lit.interop import import_hf, import_official
from llava_lit.interop.import_lora import import_official_lora, is_official_lora
from llava_lit.interop.pretrained import PretrainedLlava, read_config_json
from llava_lit.lora_loading import build_lora_model, is_lora_run
from llava_lit.model.llava import LlavaModel, LlavaModelConfig
from llava_lit.untrusted import ConfigRefused, check_plain_data

MODULE_PREFIX = "model."
"""`LlavaLitModule` holds the `LlavaModel` as `self.model`, so training checkpoint keys start with this."""

DCP_META_FILE = "meta.pt"
"""Lightning's file for the non-tensor part of a distributed checkpoint (holds `llava_lit_config`)."""

DCP_METADATA_FILE = ".metadata"
"""The index torch.distributed.checkpoint writes into every checkpoint directory."""

HF_MODEL_TYPES = ("llava", "llava_next")
"""`config.json` model types of transformers LLaVA folders (`llava_next`: LLaVA-NeXT, an AnyRes model here)."""

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files (or their shard index) of a Hugging Face-style folder."""

INFERENCE_DATA_KEYS = ("template", "system_prompt", "image_aspect", "max_length")
"""The `data` settings of a stored run config that loading reads."""


class CheckpointKind(enum.Enum):
    """The kinds of path `read_checkpoint` reads."""

    LIGHTNING_FILE = "Lightning checkpoint file (*.ckpt)"
    DISTRIBUTED_DIR = "FSDP2 distributed-checkpoint directory (.metadata + meta.pt)"
    EXPORTED_FOLDER = "llava_lit export (transformers LLaVA / LLaVA-NeXT folder, model card tagged llava_lit)"
    HF_FOLDER = "transformers LLaVA folder (llava-hf, config.json model_type 'llava' or 'llava_next')"
    OFFICIAL_FOLDER = "official LLaVA folder (config.json model_type 'llava_*' with mm_vision_tower)"
    OFFICIAL_PROJECTOR = "official stage-1 projector (mm_projector.bin beside its run's config.json)"
    OFFICIAL_LORA = "official LoRA folder (adapter_config.json + non_lora_trainables.bin + config.json)"
    HUB_ID = "hub id 'owner/name' of one of the folder kinds"


class NotACheckpoint(ValueError):
    """A path that is none of the `CheckpointKind`s."""


def _refuse(path: Path | str, why: str) -> NotACheckpoint:
    kinds = "; ".join(kind.value for kind in CheckpointKind)
    return NotACheckpoint(f"{path}: {why}. Looked for: {kinds}")


def is_hub_id(source: str) -> bool:
    """Whether `source` has the form of a hub id (`owner/name`) rather than a local path."""
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and not source.endswith((".ckpt", ".ckpt.dir", ".bin", ".safetensors"))
    )


def classify_checkpoint(path: str | Path) -> CheckpointKind:
    """Which kind of checkpoint `path` is, from its name and its small metadata files (no weights are read).

    Raises `NotACheckpoint` naming every kind looked for when it is none, and `FileNotFoundError` for a local
    path that does not exist.
    """
    text = str(path)
    local = Path(text).expanduser()
    if not local.exists():
        if is_hub_id(text):
            return CheckpointKind.HUB_ID
        raise FileNotFoundError(
            f"checkpoint not found: {text} (neither an existing path nor a hub id owner/name)"
        )
    if local.is_file():
        if local.suffix == ".ckpt":
            return CheckpointKind.LIGHTNING_FILE
        if local.suffix in (".bin", ".safetensors") and "projector" in local.name:
            if not (local.parent / "config.json").is_file():
                raise _refuse(
                    local,
                    "a projector-only file without the config.json of its run, so the vision tower and LLM it "
                    "belongs to are unknown: train from it with `init_projector=` and your model config",
                )
            return CheckpointKind.OFFICIAL_PROJECTOR
        raise _refuse(local, "a file that is neither a .ckpt nor an mm_projector.bin")
    if (local / DCP_METADATA_FILE).is_file():
        if not (local / DCP_META_FILE).is_file():
            raise _refuse(local, f"a distributed checkpoint directory without {DCP_META_FILE}")
        return CheckpointKind.DISTRIBUTED_DIR
    if is_official_lora(local):
        return CheckpointKind.OFFICIAL_LORA
    config_path = local / "config.json"
    if not config_path.is_file():
        raise _refuse(
            local,
            "a directory with neither .metadata (not a distributed training checkpoint) nor config.json",
        )
    config = read_config_json(config_path)
    model_type = str(config.get("model_type", ""))
    if model_type in HF_MODEL_TYPES:
        return CheckpointKind.EXPORTED_FOLDER if _is_our_export(local) else CheckpointKind.HF_FOLDER
    if "mm_vision_tower" in config or model_type.startswith("llava_"):
        if (
            any((local / name).exists() for name in WEIGHT_FILES)
            or not (local / "mm_projector.bin").is_file()
        ):
            return CheckpointKind.OFFICIAL_FOLDER
        return CheckpointKind.OFFICIAL_PROJECTOR
    raise _refuse(
        local,
        f"config.json has model_type {config.get('model_type')!r}, neither transformers' 'llava' / 'llava_next' "
        "nor an official LLaVA 'llava_*' with mm_vision_tower",
    )


def _is_our_export(folder: Path) -> bool:
    """Whether a transformers LLaVA folder is a llava_lit export: its model card's front matter tags llava_lit."""
    card = folder / "README.md"
    if not card.is_file():
        return False
    head = card.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0]
    return "- llava_lit" in head.splitlines()


def resolve_source(source: str) -> Path:
    """A local path as is; a hub id fetched into (or found in) the Hugging Face cache."""
    if classify_checkpoint(source) is not CheckpointKind.HUB_ID:
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source))


def default_workdir(source: str) -> Path:
    """Where the backbone configs of an imported `source` are written (under the llava_lit cache)."""
    digest = hashlib.sha1(
        str(Path(source).resolve() if Path(source).exists() else source).encode()
    ).hexdigest()
    return cache_dir() / "imported" / digest[:16]


def read_checkpoint(source: str | Path, *, workdir: str | Path | None = None) -> PretrainedLlava:
    """Read any supported checkpoint (see the module docstring) into a `PretrainedLlava`.

    Args:
        source: a local file or folder, or a hub id.
        workdir: where to write the backbone configs an imported folder holds only inside its own `config.json`;
            default under the llava_lit cache (`$LLAVA_LIT_CACHE/imported/<hash of source>`).
    """
    source = str(source)
    path = resolve_source(source)
    kind = classify_checkpoint(path)
    work = Path(workdir) if workdir is not None else default_workdir(source)
    if kind is CheckpointKind.LIGHTNING_FILE:
        return _read_lightning_file(path, source)
    if kind is CheckpointKind.DISTRIBUTED_DIR:
        return _read_distributed_dir(path, source)
    if kind in (CheckpointKind.EXPORTED_FOLDER, CheckpointKind.HF_FOLDER):
        return import_hf.import_hf(path, work, source=source)
    if kind is CheckpointKind.OFFICIAL_LORA:
        return import_official_lora(path, work, source=source)
    if kind is CheckpointKind.OFFICIAL_PROJECTOR and path.is_file():
        return import_official.import_official(path.parent, work, source=source, projector_file=path)
    return import_official.import_official(path, work, source=source)


def _read_lightning_file(path: Path, source: str) -> PretrainedLlava:
    """Our Lightning checkpoint file: run config checked first, then the model's tensors (memory-mapped)."""
    run_config, state_dict = load_lightning_file(path)
    if is_lora_run(run_config):
        model, _ = build_lora_run(run_config, state_dict, source=source)
        return _trained(run_config, dict(model.state_dict()), source)
    return _trained(run_config, _strip_module_prefix(state_dict, path), source)


def load_lightning_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A Lightning checkpoint file's checked run config and its `state_dict` (memory-mapped, `model.` keys)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    run_config = checked_run_config(checkpoint, path)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    return run_config, checkpoint.pop("state_dict")


def build_lora_run(
    run_config: dict[str, Any], state_dict: Mapping[str, torch.Tensor], *, source: str, merge: bool = True
) -> tuple[LlavaModel, PreTrainedTokenizerBase]:
    """A LoRA run's model from its adapter-only `state_dict`: its base (the run's `init_from`, read here, else its
    model config) with the adapters loaded, and merged unless `merge=False` (`lora_loading.build_lora_model`)."""
    init_from = run_config.get("init_from")
    base = read_checkpoint(init_from).build() if init_from else None
    return build_lora_model(run_config, state_dict, source=source, base=base, merge=merge)


def _read_distributed_dir(path: Path, source: str) -> PretrainedLlava:
    """Our FSDP2 checkpoint directory: run config from `meta.pt`, then only `state_dict.model.*` from the shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    checkpoint = torch.load(path / DCP_META_FILE, map_location="cpu", weights_only=True)
    run_config = checked_run_config(checkpoint, path)
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    prefix = f"state_dict.{MODULE_PREFIX}"
    targets = {
        MODULE_PREFIX + key[len(prefix) :]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not targets:
        raise ValueError(f"{path} holds no model tensors (state_dict.{MODULE_PREFIX}*)")
    # Without a process group DCP reads on this process alone; keys absent from the request (the optimizer) are
    # never read.
    dcp.load({"state_dict": targets}, checkpoint_id=str(path))
    return _trained(run_config, _strip_module_prefix(targets, path), source)


def _trained(run_config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> PretrainedLlava:
    data = run_config["data"]
    return PretrainedLlava(
        config=LlavaModelConfig.from_data(run_config["model"], source=source),
        state_dict=state,
        pretrained_parts=(),
        kind="llava_lit",
        source=source,
        template=data["template"],
        system_prompt=data["system_prompt"],
        image_aspect=data["image_aspect"],
        run_config=run_config,
    )


def _strip_module_prefix(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(MODULE_PREFIX):
            raise ValueError(f"{path}: unexpected state_dict key {key!r} (expected '{MODULE_PREFIX}...')")
        out[key[len(MODULE_PREFIX) :]] = value
    return out


def checked_run_config(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The run config stored in a training checkpoint, checked to be plain data of the expected shape."""
    config = checkpoint.get("llava_lit_config")
    if not isinstance(config, Mapping) or "model" not in config or "data" not in config:
        raise ValueError(
            f"{path} has no 'llava_lit_config' with 'model' and 'data' nodes: it was not written by llava_lit's "
            "training, so the model, tokenizer and template cannot be rebuilt from it"
        )
    config = copy.deepcopy(dict(config))
    config["model"] = LlavaModelConfig.from_data(config["model"], source=str(path)).to_node()
    config["data"] = {**config["data"], **checked_data_settings(config["data"], source=str(path))}
    return config


def checked_data_settings(data: Any, *, source: str) -> dict[str, Any]:
    """The data settings loading needs (`template`, `system_prompt`, `image_aspect`, `max_length`), read from a
    file's run config and checked: plain values of the right type, a known template and aspect mode."""
    where = f"{source}: data"
    if not isinstance(data, Mapping):
        raise ConfigRefused(f"{where} must be a mapping of settings, got {type(data).__name__}")
    out = {key: check_plain_data(data.get(key), f"{where}.{key}") for key in INFERENCE_DATA_KEYS}
    if out["template"] not in TEMPLATES:
        raise ConfigRefused(
            f"{where}.template = {out['template']!r:.80}; known templates: {sorted(TEMPLATES)}"
        )
    if out["system_prompt"] is not None and not isinstance(out["system_prompt"], str):
        raise ConfigRefused(f"{where}.system_prompt must be a string or null")
    if out["image_aspect"] is None:
        out["image_aspect"] = "pad"
    if out["image_aspect"] not in ASPECT_MODES:
        raise ConfigRefused(
            f"{where}.image_aspect = {out['image_aspect']!r:.80}; allowed: {list(ASPECT_MODES)}"
        )
    if out["max_length"] is not None and (
        isinstance(out["max_length"], bool) or not isinstance(out["max_length"], int)
    ):
        raise ConfigRefused(f"{where}.max_length must be an integer or null")
    return out
