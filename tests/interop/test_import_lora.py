"""Official LLaVA LoRA checkpoints (`llava-v1.5-7b-lora` layout) import with `init_from=`, the adapter merged.

The folder is written here as the official trainer leaves it: the LLM adapter saved by peft (keys
`base_model.model.model.layers.*.lora_{A,B}.weight`), `non_lora_trainables.bin` with the projector under
`base_model.model.model.mm_projector.*`, and a `llava_llama` config.json naming the base LLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_lit.checkpoint_reader import read_checkpoint


def _official_lora_folder(tiny_backbones: Path, folder: Path) -> tuple[torch.nn.Module, dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    llm = AutoModelForCausalLM.from_pretrained(str(tiny_backbones / "llm"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(llm, config)
    peft_model.save_pretrained(str(folder))
    projector = {
        "base_model.model.model.mm_projector.0.weight": torch.randn(64, 32),
        "base_model.model.model.mm_projector.0.bias": torch.randn(64),
        "base_model.model.model.mm_projector.2.weight": torch.randn(64, 64),
        "base_model.model.model.mm_projector.2.bias": torch.randn(64),
    }
    torch.save(projector, folder / "non_lora_trainables.bin")
    official = {
        "model_type": "llava_llama",
        "_name_or_path": str(tiny_backbones / "llm"),
        "mm_vision_tower": str(tiny_backbones / "clip"),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        **json.loads((tiny_backbones / "llm" / "config.json").read_text()),
    }
    official["model_type"] = "llava_llama"
    (folder / "config.json").write_text(json.dumps(official))
    return peft_model.merge_and_unload().eval(), projector


def test_official_lora_imports_merged(tiny_backbones: Path, tmp_path: Path) -> None:
    folder = tmp_path / "llava-v1.5-tiny-lora"
    merged, projector = _official_lora_folder(tiny_backbones, folder)

    pretrained = read_checkpoint(str(folder), workdir=tmp_path / "work")
    assert pretrained.kind == "official_lora" and pretrained.image_aspect == "pad"
    model, _ = pretrained.build()
    model.eval()
    for key, value in projector.items():
        ours = model.state_dict()["projector." + key.removeprefix("base_model.model.model.mm_projector.")]
        assert torch.equal(ours, value), key
    ids = torch.randint(3, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            model.language_model(input_ids=ids).logits[..., :32000], merged(ids).logits
        )


def test_official_lora_with_other_trainables_is_refused(tiny_backbones: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd-lora"
    _official_lora_folder(tiny_backbones, folder)
    torch.save(
        {"base_model.model.model.embed_tokens.weight": torch.zeros(2, 2)}, folder / "non_lora_trainables.bin"
    )
    with pytest.raises(ValueError, match="only the projector"):
        read_checkpoint(str(folder), workdir=tmp_path / "work")
