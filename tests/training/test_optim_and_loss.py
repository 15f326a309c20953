"""The loss's single label shift, the LR schedule, optimizer groups and the batch arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llava_lit.constants import IGNORE_INDEX
from llava_lit.module import next_token_loss, parameter_groups, warmup_cosine
from llava_lit.train import fitted_micro_batch, gradient_accumulation


def test_next_token_loss_shifts_once_and_ignores_masked():
    vocab = 5
    # Logits that put all mass on token (i + 1) % vocab at position i.
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    logits = torch.full((1, 5, vocab), -1e4)
    for i in range(5):
        logits[0, i, (i + 1) % vocab] = 1e4
    labels = ids.clone()
    assert next_token_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    # A wrong prediction at a masked target contributes nothing.
    labels_masked = labels.clone()
    labels_masked[0, 3] = IGNORE_INDEX
    logits[0, 2] = 0.0
    assert next_token_loss(logits, labels_masked).item() == pytest.approx(0.0, abs=1e-6)
    # ...but counts when unmasked: uniform logits give log(vocab) on that one of 4 targets.
    assert next_token_loss(logits, labels).item() == pytest.approx(math.log(vocab) / 4, rel=1e-4)


def test_warmup_cosine_shape():
    f = lambda s: warmup_cosine(s, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = nn.Linear(4, 4)
        self.projector = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8))
        self.language_model = nn.ModuleDict({"proj": nn.Linear(8, 8), "norm": nn.LayerNorm(8)})


def test_parameter_groups_decay_and_projector_lr():
    toy = _Toy()
    toy.vision_tower.requires_grad_(False)
    groups = {
        g["name"]: g for g in parameter_groups(toy.named_parameters(), weight_decay=0.1, projector_lr=1e-3)
    }
    assert set(groups) == {"model/decay", "model/no_decay", "projector/decay", "projector/no_decay"}
    assert groups["projector/decay"]["lr"] == 1e-3 and "lr" not in groups["model/decay"]
    assert groups["model/no_decay"]["weight_decay"] == 0.0 and groups["model/decay"]["weight_decay"] == 0.1
    # Norm weights and biases never decay; the frozen tower is absent.
    no_decay = {id(p) for p in groups["model/no_decay"]["params"]}
    assert (
        id(toy.language_model["norm"].weight) in no_decay and id(toy.language_model["proj"].bias) in no_decay
    )
    all_ids = {id(p) for g in groups.values() for p in g["params"]}
    assert not any(id(p) in all_ids for p in toy.vision_tower.parameters())


def test_parameter_groups_refuses_nothing_trainable():
    toy = _Toy().requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameters"):
        parameter_groups(toy.named_parameters(), weight_decay=0.0, projector_lr=None)


@pytest.mark.parametrize(
    ("gbs", "mbs", "world", "expected"), [(256, 32, 8, 1), (128, 16, 2, 4), (32, 8, 1, 4)]
)
def test_gradient_accumulation(gbs, mbs, world, expected):
    assert gradient_accumulation(gbs, mbs, world) == expected


def test_gradient_accumulation_rejects_indivisible():
    with pytest.raises(ValueError, match="not a multiple"):
        gradient_accumulation(100, 8, 3)


@pytest.mark.parametrize(
    ("gbs", "mbs", "world", "expected"),
    [(32, 32, 8, 4), (32, 32, 1, 32), (128, 16, 8, 16), (128, 16, 4, 16), (96, 16, 4, 12), (30, 4, 1, 3)],
)
def test_micro_batch_fits_the_global_batch_on_any_device_count(gbs, mbs, world, expected):
    micro = fitted_micro_batch(gbs, mbs, world)
    assert micro == expected
    assert gradient_accumulation(gbs, micro, world) * micro * world == gbs


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(ValueError, match="does not split equally over 3 processes"):
        fitted_micro_batch(100, 8, 3)
