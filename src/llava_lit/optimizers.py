"""Optimizers by name: `optimizer.name=adamw_8bit` picks bitsandbytes' 8-bit AdamW, and so on.

The config's `optimizer` node is a partial of `build_optimizer` (Hydra `_partial_: true`); the LightningModule calls
it with its parameter groups (decay / no-decay x projector / vision tower / rest), which every optimizer here keeps
as given, with their own learning rates and weight decay.

| name | optimizer | state per trained parameter |
|---|---|---|
| `adamw` | `torch.optim.AdamW` (foreach) | two fp32 moments (8 bytes) |
| `adamw_fused` | `torch.optim.AdamW(fused=True)` (one kernel per step; CUDA, and the CPU in torch >= 2.4) | 8 bytes |
| `adamw_8bit` | `bitsandbytes.optim.AdamW8bit` (block-wise 8-bit moments) | 2 bytes (+ block scales) |
| `paged_adamw_8bit` | `bitsandbytes.optim.PagedAdamW8bit` (8-bit moments in paged memory that spills to the host) | 2 bytes |
| `paged_adamw_32bit` | `bitsandbytes.optim.PagedAdamW32bit` (fp32 moments in paged memory) | 8 bytes |

bitsandbytes keeps 32-bit moments for tensors under 4096 elements (`min_8bit_size`) in its 8-bit optimizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def _torch_adamw(fused: bool) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)

    return make


def _bnb(name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(params, **kwargs)

    return make


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _torch_adamw(fused=False),
    "adamw_fused": _torch_adamw(fused=True),
    "adamw_8bit": _bnb("AdamW8bit"),
    "paged_adamw_8bit": _bnb("PagedAdamW8bit"),
    "paged_adamw_32bit": _bnb("PagedAdamW32bit"),
}
"""Optimizer names `optimizer.name` accepts -> constructors taking (param groups, lr=, betas=, eps=, weight_decay=)."""


def build_optimizer(
    params: Iterable[Any],
    *,
    name: str = "adamw",
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimizer `name` (see `OPTIMIZERS`) over `params` (parameter groups may set their own `lr` and
    `weight_decay`); `weight_decay` is the default for groups that set none."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r}: expected one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
