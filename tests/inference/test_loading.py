"""Loading from an FSDP2-style distributed checkpoint directory and with a 4-bit language model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from llava_lit.inference import SamplingParams, load_for_inference


def test_distributed_checkpoint_directory_loads_the_same_model(tiny_checkpoint, tiny_bundle, tmp_path):
    # The layout Lightning's ModelParallelStrategy writes: model (and optimizer) tensors as DCP shards under
    # "state_dict" / "optimizer_0", everything else in meta.pt.
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    folder = tmp_path / "last.ckpt"
    fake_optimizer = {"state": {"0": {"exp_avg": torch.ones(3)}}}
    dcp.save({"state_dict": ckpt.pop("state_dict"), "optimizer_0": fake_optimizer}, checkpoint_id=str(folder))
    torch.save(ckpt, folder / "meta.pt")
    bundle = load_for_inference(folder)
    for key, value in tiny_bundle.model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[key], value), key
    assert bundle.template.name == tiny_bundle.template.name


def test_directory_without_checkpoint_files_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a distributed training checkpoint"):
        load_for_inference(tmp_path)


def test_4bit_language_model_keeps_a_full_precision_projector(tiny_checkpoint, tiny_bundle):
    import bitsandbytes as bnb

    bundle = load_for_inference(tiny_checkpoint, load_in_4bit=True)
    layers = list(bundle.model.language_model.modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    assert all(p.dtype == torch.float32 for p in bundle.model.projector.parameters())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in bundle.model.projector.modules())
    prompt = bundle.prompt([{"from": "human", "value": "Hello there"}])
    answer = bundle.generator().generate([prompt], SamplingParams(max_new_tokens=4))[0]
    assert answer.completion_tokens == 4 or answer.finish_reason == "stop"
