"""The stage handoff: a projector-only weights file written by `align` and read by `finetune`.

`align` writes `projector.safetensors` (keys as in `projector.state_dict()`, e.g. `0.weight`, `2.bias`) next
to its full resumable Lightning checkpoint when it completes. `finetune` loads it through `init_projector=PATH`, which also accepts
the official LLaVA `mm_projector.bin` (keys `model.mm_projector.0.weight`, ..., or `model.mm_projector.weight`
for `linear`): everything up to and including `mm_projector.` is stripped, as the official loader does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save
from torch import nn

from llava_lit.atomic_files import atomic_file

log = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as plain CPU tensors, gathering FSDP2 shards (collective: call on every rank)."""
    out = {}
    for key, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = value.detach().to("cpu").contiguous()
    return out


def read_projector_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a projector file: our safetensors, or the official `mm_projector.bin` (a pickled dict of tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Projector weights not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        # weights_only refuses anything but tensors and plain containers: no arbitrary unpickling.
        state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for key, value in state.items():
        if "mm_projector." in key:
            key = key.split("mm_projector.", 1)[1]
        out[key] = value
    return out


NEWLINE_KEY = "image_newline"
"""The AnyRes row-end vector's key in a projector's state dict (`model.llava.add_image_newline`)."""


def load_projector(projector: nn.Module, path: str | Path) -> None:
    """Load weights into `projector` strictly, with a clear error when shapes or keys disagree.

    One exception: an AnyRes model's `image_newline` keeps its fresh draw when the file, a stage-1 projector
    trained at base resolution (as LLaVA-NeXT's stage 1 is), has none.
    """
    state = read_projector_weights(path)
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if NEWLINE_KEY in expected and NEWLINE_KEY not in found:
        del expected[NEWLINE_KEY]
        log.info("%s has no %s: the AnyRes row-end vector starts from its fresh draw", path, NEWLINE_KEY)
    if expected != found:
        raise ValueError(
            f"Projector weights in {path} do not fit this model's projector.\n"
            f"  model expects: {json.dumps(expected)}\n  file holds:    {json.dumps(found)}\n"
            "Stage-1 weights only fit a model with the same projector type, vision width and LLM width."
        )
    with torch.no_grad():
        for key, param in projector.state_dict().items():
            if key in state:
                param.copy_(state[key].to(param.dtype))
    log.info("Loaded projector weights from %s (%d tensors)", path, len(state))


class ProjectorExport(L.Callback):
    """Writes `projector.safetensors` into the checkpoint folder when training completes.

    Only a finished stage writes it (not a preempted or failed one), so `finetune`'s default `init_projector`
    never starts from a half-trained projector; the file is replaced atomically.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = full_state_dict(pl_module.model.projector)  # collective under FSDP2: every rank gathers
        if trainer.is_global_zero:
            write_projector(self.dirpath / PROJECTOR_FILE, weights, global_step=trainer.global_step)


def write_projector(path: str | Path, weights: dict[str, torch.Tensor], *, global_step: int) -> Path:
    """Write projector weights as safetensors (with the step in the metadata), atomically."""
    with atomic_file(path) as handle:
        handle.write(save(weights, metadata={"global_step": str(global_step)}))
    return Path(path)
