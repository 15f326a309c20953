"""`python -m llava_lit.export` from training checkpoints: a Lightning file and an FSDP2 distributed directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import LlavaForConditionalGeneration

from llava_lit.checkpoint_reader import read_checkpoint
from llava_lit.export import main
from llava_lit.hydra_app import compose_config


@pytest.mark.parametrize("layout", ["file", "distributed"])
def test_export_from_training_checkpoint(
    layout: str, make_tiny, tiny_run_config: dict, tiny_backbones: Path, tmp_path: Path
) -> None:
    model = make_tiny(seed=11)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = {"llava_lit_config": tiny_run_config, "global_step": 3, "epoch": 0}
    if layout == "file":
        checkpoint = tmp_path / "last.ckpt"
        torch.save({**meta, "state_dict": state}, checkpoint)
    else:  # what Lightning's ModelParallelStrategy writes with save_distributed_checkpoint=true
        checkpoint = tmp_path / "last.ckpt.dir"
        dcp.save({"state_dict": state}, checkpoint_id=str(checkpoint))
        torch.save(meta, checkpoint / "meta.pt")

    # verifies logits against ours
    out = main(compose_config("export", [f"checkpoint={checkpoint}", f"out={tmp_path / 'hf'}"]))
    hf = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight, model.projector[0].weight)
    card = (out / "README.md").read_text()
    assert "finetune" in card and "vicuna_v1" in card and str(tiny_backbones / "llm") in card

    # Our own training checkpoints are also a starting point for further training.
    pretrained = read_checkpoint(str(checkpoint))
    assert pretrained.kind == "llava_lit" and pretrained.template == "vicuna_v1"
    for key, value in model.state_dict().items():
        assert torch.equal(pretrained.state_dict[key], value), key
