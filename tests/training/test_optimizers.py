"""Optimizers by name: each builds over the module's parameter groups, keeps their rates and decay, and steps."""

from __future__ import annotations

import pytest
import torch

from llava_lit.module import parameter_groups
from llava_lit.optimizers import OPTIMIZERS, build_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {
            "projector": torch.nn.Linear(64, 80),
            "vision_tower": torch.nn.Linear(64, 64),
            "language_model": torch.nn.Linear(80, 80),
        }
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_by_name_keeps_groups_and_steps(name: str) -> None:
    model = _model()
    groups = parameter_groups(
        model.named_parameters(), weight_decay=0.1, projector_lr=2e-5, vision_tower_lr=1e-6
    )
    optimizer = build_optimizer(groups, name=name, lr=2e-4)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert set(by_name) == {
        f"{part}/{kind}" for part in ("model", "projector", "vision_tower") for kind in ("decay", "no_decay")
    }
    assert by_name["projector/decay"]["lr"] == 2e-5 and by_name["vision_tower/decay"]["lr"] == 1e-6
    assert by_name["model/decay"]["lr"] == 2e-4
    assert by_name["model/decay"]["weight_decay"] == 0.1 and by_name["model/no_decay"]["weight_decay"] == 0.0
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 64)
    loss = model["language_model"](model["projector"](x)).sum() + model["vision_tower"](x).sum()
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The state survives a round trip through a checkpoint (resume).
    state = optimizer.state_dict()
    again = build_optimizer(
        parameter_groups(model.named_parameters(), weight_decay=0.1, projector_lr=2e-5, vision_tower_lr=1e-6),
        name=name,
        lr=2e-4,
    )
    again.load_state_dict(state)


def test_8bit_optimizer_keeps_8bit_moments() -> None:
    model = _model()
    optimizer = build_optimizer(model.parameters(), name="adamw_8bit", lr=1e-3)
    model["language_model"](torch.randn(2, 80)).sum().backward()
    optimizer.step()
    state = optimizer.state[model["language_model"].weight]  # 6400 elements: above bitsandbytes' 4096 minimum
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        build_optimizer(_model().parameters(), name="sgd", lr=1.0)


def test_without_vision_tower_lr_the_tower_stays_in_the_model_groups() -> None:
    groups = parameter_groups(_model().named_parameters(), weight_decay=0.0, projector_lr=None)
    assert {g["name"] for g in groups} == {
        "model/decay",
        "model/no_decay",
        "projector/decay",
        "projector/no_decay",
    }
