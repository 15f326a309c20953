"""The stage switch: what each stage trains, and loud failures for unknown stages or submodules."""

from __future__ import annotations

import pytest
from torch import nn

from llava_lit.stages import set_trainable, trainable_modules


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = nn.Linear(4, 4)
        self.projector = nn.Linear(4, 8)
        self.language_model = nn.Linear(8, 8)


def _trainable(model: nn.Module) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("stage", "tower", "expected"),
    [
        ("align", False, {"projector"}),
        ("finetune", False, {"projector", "language_model"}),
        ("finetune", True, {"projector", "language_model", "vision_tower"}),
    ],
)
def test_stage_trains_exactly_its_modules(stage, tower, expected):
    model = _Toy()
    counts = set_trainable(model, trainable_modules(stage, train_vision_tower=tower))
    assert _trainable(model) == expected
    assert counts["projector"] == {"trainable": 4 * 8 + 8, "frozen": 0}
    assert counts["vision_tower"]["trainable"] == (20 if tower else 0)


def test_unknown_stage_raises():
    with pytest.raises(ValueError, match="Unknown stage 'pretrain'"):
        trainable_modules("pretrain")


def test_unknown_submodule_raises():
    with pytest.raises(ValueError, match="no submodule"):
        set_trainable(_Toy(), ("projector", "resampler"))
