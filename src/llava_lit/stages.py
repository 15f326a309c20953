"""The two LLaVA training stages as one explicit switch, and the callback that applies it.

`align` (stage 1) trains the projector only; `finetune` (stage 2) trains the projector and the LLM. The vision
tower stays frozen in both unless the config asks for it (the official code cannot unfreeze it). Freezing
happens in the callback's `setup`, which Lightning runs before `configure_model` and before the strategy wraps
or shards the model, so FSDP sees the final `requires_grad` flags.
"""

from __future__ import annotations

import logging

import lightning as L
from torch import nn

from llava_lit.lora import LoraSettings, freeze_base

log = logging.getLogger(__name__)

STAGES: dict[str, tuple[str, ...]] = {
    "align": ("projector",),
    "finetune": ("projector", "language_model"),
}
"""Which top-level submodules of `LlavaModel` each stage trains."""


def trainable_modules(stage: str, *, train_vision_tower: bool = False) -> tuple[str, ...]:
    """The submodule names trained in `stage`; raises on an unknown stage."""
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}: expected one of {sorted(STAGES)}")
    names = STAGES[stage]
    return (*names, "vision_tower") if train_vision_tower else names


def set_trainable(model: nn.Module, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Freeze every parameter of `model`, then unfreeze the named top-level submodules.

    Returns `{submodule: {"trainable": n, "frozen": n}}` parameter counts for logging.
    """
    children = dict(model.named_children())
    unknown = set(names) - set(children)
    if unknown:
        raise ValueError(f"Model has no submodule(s) {sorted(unknown)}; it has {sorted(children)}")
    model.requires_grad_(False)
    for name in names:
        children[name].requires_grad_(True)
    return parameter_counts(model)


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """`{submodule: {"trainable": n, "frozen": n}}` parameter counts of `model`'s top-level submodules."""
    counts = {}
    for name, child in model.named_children():
        trainable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        total = sum(p.numel() for p in child.parameters())
        counts[name] = {"trainable": trainable, "frozen": total - trainable}
    return counts


class StageFreezer(L.Callback):
    """Applies a stage's freezing rule to `pl_module.model` before the model is configured or sharded."""

    def __init__(
        self, stage: str, train_vision_tower: bool = False, lora: LoraSettings | None = None
    ) -> None:
        self.names = trainable_modules(stage, train_vision_tower=train_vision_tower)
        self.stage = stage
        self.lora = lora if lora is not None and lora.enabled else None
        self.counts: dict[str, dict[str, int]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.lora is None:
            self.counts = set_trainable(pl_module.model, self.names)
        else:  # of the LLM only its adapters train (a 4-bit base cannot even require gradients)
            set_trainable(pl_module.model, tuple(n for n in self.names if n != "language_model"))
            freeze_base(pl_module.model, self.lora)
            self.counts = parameter_counts(pl_module.model)
        for name, c in self.counts.items():
            log.info(
                "stage %s: %-15s trainable %13s  frozen %13s",
                self.stage,
                name,
                f"{c['trainable']:,}",
                f"{c['frozen']:,}",
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Loggers are ready by now (they are not at setup time).
        flat = {f"params/{name}/{kind}": n for name, c in self.counts.items() for kind, n in c.items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(flat)
