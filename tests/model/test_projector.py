"""Projector types, their module layout (so official `mm_projector.bin` keys load) and errors."""

from __future__ import annotations

import pytest
from torch import nn

from llava_lit.model import build_projector


def test_linear_is_one_linear_layer() -> None:
    proj = build_projector("linear", 1024, 4096)
    assert isinstance(proj, nn.Linear)
    assert set(proj.state_dict()) == {"weight", "bias"}
    assert sum(p.numel() for p in proj.parameters()) == 4_198_400


def test_mlp2x_gelu_has_official_indices() -> None:
    proj = build_projector("mlp2x_gelu", 1024, 4096)
    assert [type(m) for m in proj] == [nn.Linear, nn.GELU, nn.Linear]
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == {
        "0.weight": (4096, 1024),
        "0.bias": (4096,),
        "2.weight": (4096, 4096),
        "2.bias": (4096,),
    }
    assert sum(p.numel() for p in proj.parameters()) == 20_979_712


def test_mlp3x_gelu_stacks_three_linears() -> None:
    proj = build_projector("mlp3x_gelu", 8, 16)
    assert [type(m) for m in proj] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert proj[4].in_features == 16


def test_identity_needs_equal_widths() -> None:
    assert isinstance(build_projector("identity", 32, 32), nn.Identity)
    with pytest.raises(ValueError, match="equal widths"):
        build_projector("identity", 32, 64)


@pytest.mark.parametrize("kind", ["mlp", "mlp2x_relu", "qformer", "mlp0x_gelu", "Linear"])
def test_unknown_projector_raises_naming_allowed_types(kind: str) -> None:
    with pytest.raises(ValueError, match=r"linear.*mlp\{N\}x_gelu.*identity|depth must be at least 1"):
        build_projector(kind, 8, 16)
