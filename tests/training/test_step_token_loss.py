"""The training loss is the mean over all supervised tokens of an optimizer step, across its accumulated
micro-batches and ranks: the gradients Lightning hands the optimizer equal those of `sum / count` over the step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_lit.collate import supervised_tokens
from llava_lit.module import next_token_loss, step_token_loss
from llava_lit.tokenization import load_tokenizer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from step_loss_run import build_model, step_batches  # noqa: E402


def reference_gradients(backbones: Path, batches: list[dict], per_micro_batch: bool = False) -> dict:
    model = build_model(backbones).train()
    total = sum(int(supervised_tokens(b["labels"])) for b in batches)
    losses = []
    for b in batches:
        position_ids = b.get("position_ids")
        logits = model(
            b["input_ids"],
            b["attention_mask"],
            b["pixel_values"],
            position_ids=position_ids,
            packed=position_ids is not None,
        ).logits
        if per_micro_batch:
            losses.append(next_token_loss(logits, b["labels"]) / len(batches))
        else:
            losses.append(next_token_loss(logits, b["labels"], reduction="sum") / total)
    sum(losses).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def run_step(backbones: Path, out: Path, world_size: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(HERE / "step_loss_run.py"), str(backbones), str(out), str(world_size)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def assert_same(grads: dict, expected: dict) -> None:
    assert grads.keys() == expected.keys() and "projector.0.weight" in grads
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_step_gradients_are_those_of_the_step_token_mean(tiny_backbones, tmp_path, world_size):
    tokenizer = load_tokenizer(str(tiny_backbones / "llm"))
    batches = step_batches(build_model(tiny_backbones), tokenizer.pad_token_id)[: 2 * world_size]
    grads = run_step(tiny_backbones, tmp_path / "grads.pt", world_size)
    assert_same(grads, reference_gradients(tiny_backbones, batches))
    # The official per-micro-batch mean weights these batches differently: the check above can fail.
    official = reference_gradients(tiny_backbones, batches, per_micro_batch=True)
    assert not torch.allclose(official["projector.0.weight"], grads["projector.0.weight"], rtol=1e-3)


def test_one_micro_batch_on_one_rank_is_exactly_the_micro_batch_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = -100
    mean = next_token_loss(logits, labels)
    (grad_mean,) = torch.autograd.grad(mean, logits)
    summed = next_token_loss(logits, labels, reduction="sum")
    scaled = step_token_loss(summed, supervised_tokens(labels).float(), accumulation=1, world_size=1)
    (grad_scaled,) = torch.autograd.grad(scaled, logits)
    assert torch.equal(scaled, mean) and torch.equal(grad_scaled, grad_mean)  # bit for bit: the world's runs
