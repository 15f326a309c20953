"""One-GPU runs of both stages in bf16 (skipped where there is no CUDA device)."""

from __future__ import annotations

import pytest
import torch

from llava_lit.train import train


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_bf16_stage_on_one_gpu(compose_train, stage):
    overrides = ["trainer=gpu", "trainer.max_steps=2", "trainer.limit_val_batches=1", "data.pin_memory=true"]
    if stage == "finetune":
        overrides.append("init_projector=null")
    metrics = train(compose_train(*overrides, stage=stage))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["perf/peak_gpu_memory_gib"] > 0
