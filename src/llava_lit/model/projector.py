"""The projector: maps vision features into the language model's embedding space.

The types and module layouts are LLaVA's (`linear` for v1, `mlp2x_gelu` for v1.5), built as the same
`nn.Linear` / `nn.Sequential` so that the official `mm_projector.bin` weights (`0.weight`, `2.weight`, ...) load
into them unchanged.
"""

from __future__ import annotations

import re

from torch import nn

PROJECTOR_TYPES = ("linear", "mlp{N}x_gelu", "identity")
"""The accepted projector type names (for error messages and docs)."""

_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")


def check_projector_type(kind: str) -> None:
    """Raise `ValueError` unless `kind` names a projector type (see `PROJECTOR_TYPES`)."""
    if not isinstance(kind, str) or not (kind in ("linear", "identity") or _MLP_PATTERN.match(kind)):
        raise ValueError(f"unknown projector type {kind!r:.80}; allowed: {', '.join(PROJECTOR_TYPES)}")


def build_projector(kind: str, in_features: int, out_features: int) -> nn.Module:
    """Build a projector `[..., in_features] -> [..., out_features]`.

    - `linear`: `nn.Linear(in, out)`.
    - `mlp{N}x_gelu`: `nn.Sequential(Linear(in, out), *(N-1) x [GELU(), Linear(out, out)])`; indices 0, 2, 4, ...
      are the Linear layers, as in the official code.
    - `identity`: no parameters; needs `in_features == out_features`.
    """
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    match = _MLP_PATTERN.match(kind)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"projector {kind!r}: depth must be at least 1")
        layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_features, out_features)]
        return nn.Sequential(*layers)
    if kind == "identity":
        if in_features != out_features:
            raise ValueError(
                f"projector 'identity' needs equal widths, but vision features are {in_features} wide and the "
                f"language model's embeddings {out_features}"
            )
        return nn.Identity()
    raise ValueError(f"unknown projector type {kind!r}; allowed: {', '.join(PROJECTOR_TYPES)}")
