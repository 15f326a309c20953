"""FSDP2 (`fully_shard`) wrapping of a `LlavaModel`, in a few explicit lines.

Units: the vision tower, each LLM decoder layer and the projector are sharded separately, then the root
(embeddings, final norm, LM head). Activation checkpointing covers the LLM decoder layers only. A frozen vision
tower is cast to bf16 before sharding: it needs no fp32 master weights. The same function runs under
`trainer=fsdp_8gpu` on GPUs and in CI's 2-process CPU run (Lightning's `ModelParallelStrategy`, gloo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass
class ShardingConfig:
    """How `shard_llava` wraps the model under FSDP2."""

    param_dtype: str | None = None
    """Dtype parameters are all-gathered and computed in (e.g. `bfloat16`); None keeps their own dtype."""

    reduce_dtype: str | None = "float32"
    """Dtype of gradient reduce-scatter; fp32 keeps reductions exact under bf16 compute."""

    activation_checkpointing: bool = False
    """Recompute LLM decoder-layer activations in backward instead of storing them."""

    reshard_after_forward: bool = True
    """Free gathered parameters after forward (ZeRO-3 style); False keeps them until backward (ZeRO-2 style)."""

    frozen_vision_tower_dtype: str | None = None
    """Cast a frozen vision tower to this dtype before sharding (prismatic keeps it in bf16)."""


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute (`enabled`) or store the LLM decoder layers' activations for the backward pass.

    Non-reentrant checkpointing works with frozen embeddings and with FSDP2's hooks.
    """
    if enabled:
        model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.language_model.activation_checkpointing_disable()


def shard_llava(model: nn.Module, mesh: DeviceMesh, cfg: ShardingConfig) -> None:
    """Apply FSDP2 to `model` in place: tower, each decoder layer, projector, then the root."""
    policy = MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype))
    kwargs = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": cfg.reshard_after_forward}

    tower = model.vision_tower
    tower_frozen = not any(p.requires_grad for p in tower.parameters())
    if tower_frozen and cfg.frozen_vision_tower_dtype is not None:
        tower.to(_dtype(cfg.frozen_vision_tower_dtype))
    if cfg.activation_checkpointing:
        set_activation_checkpointing(model, True)

    fully_shard(tower, **kwargs)
    for layer in model.decoder_layers:
        fully_shard(layer, **kwargs)
    fully_shard(model.projector, **kwargs)
    fully_shard(model, **kwargs)
