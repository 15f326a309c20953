"""A real Lightning fit of one optimizer step of the tiny LLaVA with accumulation 2, on 1 or 2 CPU ranks (gloo),
saving the gradients the optimizer sees; `test_step_token_loss.py` compares them with sum / count over the step.

    python tests/training/step_loss_run.py BACKBONES_DIR OUT_FILE WORLD_SIZE

Lightning starts the second rank by running this file again; rank r trains micro-batches 2r and 2r+1 of
`step_batches`.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch

from llava_lit.collate import collate, collate_packed
from llava_lit.constants import IGNORE_INDEX
from llava_lit.datamodule import stamp_step_tokens
from llava_lit.model import LlavaModel, build_llava
from llava_lit.module import LlavaLitModule
from llava_lit.tokenization import load_tokenizer

ACCUMULATION = 2


def build_model(backbones: Path) -> LlavaModel:
    """The tiny LLaVA, the same weights on every call (frozen tower, trainable projector and LLM)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(backbones / "llm"))
    return build_llava(
        vision_tower={"name_or_path": str(backbones / "clip")},
        projector="mlp2x_gelu",
        language_model={"name_or_path": str(backbones / "llm"), "attn_implementation": "sdpa"},
        tokenizer=tokenizer,
    )


def step_batches(model: LlavaModel, pad_token_id: int) -> list[dict]:
    """Four micro-batches (two unpacked, two packed), each with an image, of very different supervised-token
    counts, so a per-micro-batch mean and the step mean differ."""
    gen = torch.Generator().manual_seed(1)

    def sample(k: int, n_text: int, supervised: int) -> dict:
        run = torch.full((model.num_image_tokens,), model.image_token_id)
        ids = torch.cat([torch.tensor([1]), run, torch.randint(3, 31000, (n_text,), generator=gen)])
        labels = ids.clone()
        labels[: len(ids) - supervised] = IGNORE_INDEX
        return {
            "id": str(k),
            "input_ids": ids,
            "labels": labels,
            "pixel_values": torch.randn(1, 3, 56, 56, generator=gen),
        }

    s = [
        sample(k, n, m)
        for k, (n, m) in enumerate([(30, 25), (6, 2), (12, 3), (20, 18), (4, 1), (9, 9), (15, 4)])
    ]
    return [
        collate([s[0]], pad_token_id),
        collate_packed([[s[1], s[2]]], pad_token_id),
        collate([s[3], s[4]], pad_token_id),
        collate_packed([[s[5]], [s[6]]], pad_token_id),
    ]


class SaveGradients(L.Callback):
    """Saves every trainable parameter's gradient at the (single) optimizer step, on rank 0."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer) -> None:
        if trainer.global_rank == 0:
            grads = {
                n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None
            }
            torch.save(grads, self.out)


def main(backbones: Path, out: Path, world_size: int) -> None:
    model = build_model(backbones)
    module = LlavaLitModule(model, partial(torch.optim.SGD, lr=0.0), warmup_ratio=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        max_steps=1,
        accumulate_grad_batches=ACCUMULATION,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # each rank trains exactly its own two micro-batches
        callbacks=[SaveGradients(out)],
    )
    batches = step_batches(model, load_tokenizer(str(backbones / "llm")).pad_token_id)
    rank = trainer.global_rank
    mine = list(stamp_step_tokens(batches[ACCUMULATION * rank : ACCUMULATION * (rank + 1)], ACCUMULATION))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(mine, batch_size=None))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
