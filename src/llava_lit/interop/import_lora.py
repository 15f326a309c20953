"""Import official LLaVA LoRA checkpoints (`liuhaotian/llava-v1.5-7b-lora` layout) with `init_from=`.

Such a folder holds the official `config.json` (`llava_llama`, `mm_*` fields, `_name_or_path` = the base LLM), the
LLM adapter in peft's format (`adapter_config.json` + `adapter_model.bin`/`.safetensors`, keys
`base_model.model.model.layers.*.lora_A.weight`) and `non_lora_trainables.bin`, the fully trained parameters beside
the adapter (the projector, as `base_model.model.model.mm_projector.*`). The base LLM is loaded (`base_model=`, or the
adapter's `base_model_name_or_path`), the adapter loaded over it with peft and merged, and the result is an ordinary
full-weight `PretrainedLlava` (the vision tower still from `mm_vision_tower`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llava_lit.interop.pretrained import PretrainedLlava

log = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.bin"
"""The official file of the parameters trained fully beside the adapter."""

PEFT_PREFIX = "base_model.model."
"""The prefix peft's wrapper puts before the wrapped model's keys."""


def is_official_lora(folder: Path) -> bool:
    """Whether `folder` is an official LoRA checkpoint (adapter + `non_lora_trainables.bin` + `config.json`)."""
    return (
        folder.is_dir()
        and (folder / "adapter_config.json").is_file()
        and (folder / NON_LORA_FILE).is_file()
        and (folder / "config.json").is_file()
    )


def import_official_lora(
    folder: Path, workdir: Path, *, source: str, base_model: str | None = None
) -> PretrainedLlava:
    """The model of an official LoRA folder with the adapter merged into its base LLM (see the module doc)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llava_lit.interop.import_official import import_official

    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    base = base_model or adapter_config.get("base_model_name_or_path") or config.get("_name_or_path")
    if not base:
        raise ValueError(f"{folder}: neither adapter_config.json nor config.json names the base LLM")
    trainables = torch.load(folder / NON_LORA_FILE, map_location="cpu", weights_only=True)
    projector: dict[str, torch.Tensor] = {}
    for key, value in trainables.items():
        name = key.removeprefix(PEFT_PREFIX)
        if not name.startswith("model.mm_projector."):
            raise ValueError(
                f"{folder}/{NON_LORA_FILE} holds {key!r}: only the projector is supported beside the adapter"
            )
        projector[name] = value
    # The projector and the architecture go through the official stage-1 import (base LLM + mm_projector.bin).
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(projector, workdir / "mm_projector.bin")
    stage1 = import_official(folder, workdir, source=source, projector_file=workdir / "mm_projector.bin")
    llm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(llm, str(folder)).merge_and_unload()
    state = dict(stage1.state_dict)
    state.update({"language_model." + k: v.detach().clone() for k, v in merged.state_dict().items()})
    config_node = stage1.config
    config_node.language_model.name_or_path = str(base)
    return PretrainedLlava(
        config=config_node,
        state_dict=state,
        pretrained_parts=("vision_tower.",),
        kind="official_lora",
        source=source,
        template=None,
        image_aspect=stage1.image_aspect,
        notes=[*stage1.notes, f"LoRA adapter merged into {base}"],
    )
