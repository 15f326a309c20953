"""The LightningModule around `LlavaModel`: the loss, the optimizer and schedule, sharding, and step logging.

The next-token shift happens in the loss and nowhere else: the data path emits unshifted labels
(`labels[i]` is `input_ids[i]` or `IGNORE_INDEX`), the model returns logits (or last hidden states) only, and
`next_token_loss` compares position `i`'s logits with label `i + 1` through `loss.next_token_pairs`, which the fused
loss (`module.fused_loss`) shares.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from llava_lit.collate import supervised_tokens
from llava_lit.constants import IGNORE_INDEX, STEP_TOKENS_KEY
from llava_lit.csv_logger import CSVLogger
from llava_lit.flops import StepFlops, peak_flops_for_device
from llava_lit.lora import LoraSettings, trainable_state_dict
from llava_lit.loss import fused_next_token_loss, next_token_pairs
from llava_lit.sharding import ShardingConfig, shard_llava

RNG_STATE_KEY = "llava_lit_rng_state"
"""Checkpoint entry of a LoRA run holding the torch generators' states (for the adapters' dropout)."""


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting token `i + 1` from position `i` over unmasked targets, their mean or sum.

    logits: [B, L, V]; labels: [B, L] unshifted, `IGNORE_INDEX` where no loss is wanted.
    """
    shifted_logits, shifted_labels = next_token_pairs(logits, labels)  # [B*(L-1), V], [B*(L-1)]
    # fp32 for a stable softmax
    return F.cross_entropy(
        shifted_logits.float(), shifted_labels, ignore_index=IGNORE_INDEX, reduction=reduction
    )


def step_token_loss(
    loss_sum: torch.Tensor, step_tokens: torch.Tensor, *, accumulation: int, world_size: int
) -> torch.Tensor:
    """The micro-batch's share of the step's mean over ALL its supervised tokens (HF's `num_items_in_batch`).

    `loss_sum` is this micro-batch's summed token loss and `step_tokens` the supervised tokens of the whole
    optimizer step, over its micro-batches and ranks. Lightning divides each returned loss by the accumulation
    and DDP/FSDP average the gradients over the ranks; multiplying by both first leaves exactly
    `sum over the step / step_tokens`, whatever the micro-batches' token counts.
    """
    return loss_sum / step_tokens.clamp(min=1) * (accumulation * world_size)


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    weight_decay: float,
    projector_lr: float | None,
    vision_tower_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into decay/no-decay x projector/(vision tower)/rest groups.

    Biases and norm weights (every parameter with fewer than two dimensions) get no weight decay, as in
    LLaVA's trainer. The projector groups get `projector_lr` when it is set (LLaVA's `mm_projector_lr`); with
    `vision_tower_lr` set, a trained vision tower gets groups of its own with that rate (`mm_vision_tower_lr`).
    LoRA adapters (matrices) fall in the `model` decay group.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        part = "projector" if name.startswith("projector.") or ".projector." in name else "model"
        if vision_tower_lr is not None and (name.startswith("vision_tower.") or ".vision_tower." in name):
            part = "vision_tower"
        groups.setdefault((part, param.ndim >= 2), []).append(param)
    out = []
    for (part, decay), params in sorted(groups.items()):
        group: dict[str, Any] = {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{part}/{'decay' if decay else 'no_decay'}",
        }
        if part == "projector" and projector_lr is not None:
            group["lr"] = projector_lr
        if part == "vision_tower":
            group["lr"] = vision_tower_lr
        out.append(group)
    if not out:
        raise ValueError("No trainable parameters: check the stage's freezing rule")
    return out


def compile_decoder_layers(model: nn.Module) -> None:
    """Compile each LLM decoder layer in place (`nn.Module.compile`), as litgpt and torchtitan compile per block.

    One compiled graph serves every layer (same code, parameters as inputs) and, with dynamic shapes, every
    batch length, so the cost is one compile of the forward and one of the backward. Inductor fuses what
    eager mode runs as separate kernels: RMSNorm's and the rotary embedding's element-wise ops and the dtype
    casts bf16 autocast inserts around them. In place, so module names, state-dict keys and checkpoints
    are those of the uncompiled model. The world's stage-2 step (2 CPU threads, bf16) takes 0.195 s compiled
    against 0.324 s eager, after ~23 s of compiling (`docs/benchmarks.md`).
    """
    for layer in model.decoder_layers:
        layer.compile(dynamic=True)


class LlavaLitModule(L.LightningModule):
    """Trains a `LlavaModel` with next-token loss on assistant tokens.

    Args:
        model: the assembled vision tower + projector + LLM.
        optimizer: a partial optimizer constructor (Hydra `_partial_: true`) taking parameter groups.
        weight_decay: decay for matrices; biases and norms never decay.
        projector_lr: separate learning rate for the projector, or None to use the optimizer's.
        vision_tower_lr: separate learning rate for a trained vision tower, or None to use the optimizer's.
        lora: LoRA settings (`llava_lit.lora`); when enabled, checkpoints hold only the trained parameters (adapters,
            projector, a trained tower) and load back into a model rebuilt with its frozen base.
        warmup_ratio: fraction of the optimizer steps spent in linear warmup.
        min_lr_ratio: final learning rate as a fraction of the peak at the end of the cosine.
        sharding: FSDP2 settings, used when the trainer's strategy provides a device mesh.
        compile_blocks: compile each LLM decoder layer with `torch.compile` (in place, dynamic shapes) when the
            model is configured; state-dict keys and checkpoints are unchanged.
        run_config: the resolved run configuration, stored in every checkpoint so inference and export
            rebuild the model, tokenizer, template and image processing from it, never from a folder name.
        fused_loss: compute the loss from the last hidden states and the LM-head weight, a chunk of tokens at a
            time (liger-kernel on CUDA when installed), never holding the `[tokens x vocab]` logits; same shift,
            ignore rule and value as `next_token_loss`. Not under FSDP2 (refused at `configure_model`).
        peak_tflops: the accelerator's peak TFLOP/s that `perf/mfu` divides by; None looks the GPU up in
            `flops.PEAK_BF16_FLOPS` (dense bf16) and logs no MFU on the CPU or an unknown device.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        *,
        weight_decay: float = 0.0,
        projector_lr: float | None = None,
        vision_tower_lr: float | None = None,
        lora: LoraSettings | None = None,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        sharding: ShardingConfig | None = None,
        compile_blocks: bool = False,
        run_config: dict[str, Any] | None = None,
        fused_loss: bool = False,
        peak_tflops: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.projector_lr = projector_lr
        self.vision_tower_lr = vision_tower_lr
        self.lora = lora if lora is not None and lora.enabled else None
        # A LoRA checkpoint holds the trained parameters only: the frozen base comes from the run config.
        self.strict_loading = self.lora is None
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.sharding = sharding or ShardingConfig()
        self.compile_blocks = compile_blocks
        self.run_config = run_config or {}
        self.fused_loss = fused_loss
        self.peak_tflops = peak_tflops
        self._last_step_end: float | None = None
        # Set at fit start, once the stage has frozen what it freezes.
        self._step_flops: StepFlops | None = None
        self._peak_flops: float | None = None
        # Lightning calls configure_model again for each later fit/validate/predict: compile only once.
        self._blocks_compiled = False
        # A LoRA checkpoint's generator states, set at the first training batch after its restore.
        self._resumed_rng_state: dict[str, Any] | None = None

    # -- model ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if self.fused_loss:
            config = self.model.language_model.config
            if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
                raise ValueError(
                    "module.fused_loss applies the LM head as a plain linear layer; this LLM scales or caps its "
                    "logits, so set module.fused_loss=false"
                )
        if mesh is not None and self.fused_loss:
            raise ValueError(
                "module.fused_loss reads the LM-head weight outside the model's forward, where FSDP2 keeps it "
                "sharded; set module.fused_loss=false with a sharded strategy"
            )
        if mesh is not None:  # ModelParallelStrategy (FSDP2) hands us a mesh: shard before optimizers exist
            shard_llava(self.model, mesh["data_parallel"], self.sharding)
        if self.compile_blocks and not self._blocks_compiled:
            compile_decoder_layers(self.model)
            self._blocks_compiled = True

    def forward(self, batch: dict[str, Any], *, return_hidden: bool = False) -> torch.Tensor:
        """Logits [B, L, V], or with `return_hidden` the last hidden states [B, L, D] (no LM head)."""
        position_ids = batch.get("position_ids")  # present in packed batches only
        out = self.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            image_sizes=batch.get("image_sizes"),
            position_ids=position_ids,
            packed=position_ids is not None,
            return_hidden=return_hidden,
        )
        return out.last_hidden_state if return_hidden else out.logits

    def loss(self, batch: dict[str, Any], reduction: str = "mean") -> torch.Tensor:
        """Next-token loss of `batch` (mean or sum over its targets): from the logits, or fused with the LM head
        (`fused_loss`)."""
        if not self.fused_loss:
            return next_token_loss(self(batch), batch["labels"], reduction=reduction)
        head = self.model.language_model.get_output_embeddings()
        hidden = self(batch, return_hidden=True)  # [B, L, D]
        return fused_next_token_loss(
            hidden, head.weight, batch["labels"], bias=head.bias, reduction=reduction
        )

    # -- steps ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The loss whose gradient is the optimizer step's mean over all its supervised tokens.

        The training loader stamps each micro-batch with its step's supervised-token count on this rank
        (`STEP_TOKENS_KEY`); the counts of all ranks are summed here, and `step_token_loss` scales the
        micro-batch's summed loss so that Lightning's accumulation division and the ranks' gradient mean leave
        `sum / count` over the whole step. Without the stamp the loss is the micro-batch's own mean. With one
        micro-batch per step on one rank both are the same number. `train/loss` logs the micro-batch mean.
        """
        loss_sum = self.loss(batch, reduction="sum")
        tokens = supervised_tokens(batch["labels"]).to(torch.float32)
        self.log(
            "train/loss", loss_sum.detach() / tokens, prog_bar=True, batch_size=batch["input_ids"].shape[0]
        )
        step_tokens = batch.get(STEP_TOKENS_KEY)
        if step_tokens is None:
            return loss_sum / tokens
        step_tokens = step_tokens.to(device=loss_sum.device, dtype=torch.float32)
        world_size = self.trainer.world_size
        if world_size > 1:
            step_tokens = self.trainer.strategy.reduce(step_tokens, reduce_op="sum")
        return step_token_loss(
            loss_sum, step_tokens, accumulation=self.trainer.accumulate_grad_batches, world_size=world_size
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def on_fit_start(self) -> None:
        # The FLOPs formula's constants, from the model as the stage froze (and the strategy wrapped) it.
        self._step_flops = StepFlops.from_model(self.model)
        if self.peak_tflops is not None:
            self._peak_flops = self.peak_tflops * 1e12
        elif self.device.type == "cuda":
            self._peak_flops = peak_flops_for_device(torch.cuda.get_device_name(self.device))

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        # Throughput across all ranks, measured between consecutive batch ends (skips the first batch,
        # which includes data-loader start-up); every rank is taken to see a batch like this rank's.
        # `perf/tflops_per_s` is the model FLOPs of `flops.StepFlops` (all ranks); `perf/mfu` divides it by the
        # peak of all ranks' devices.
        now = time.perf_counter()
        if self._last_step_end is not None:
            dt = now - self._last_step_end
            ranks = self.trainer.world_size
            samples = len(batch["ids"]) * ranks  # packed rows hold several samples
            tokens = int(batch["attention_mask"].sum()) * ranks
            metrics = {"perf/samples_per_s": samples / dt, "perf/tokens_per_s": tokens / dt}
            if self._step_flops is not None:
                flops_per_s = self._step_flops.batch(batch) * ranks / dt
                metrics["perf/tflops_per_s"] = flops_per_s / 1e12
                if self._peak_flops is not None:
                    metrics["perf/mfu"] = flops_per_s / (self._peak_flops * ranks)
            self.log_dict(metrics, batch_size=batch["input_ids"].shape[0])
        self._last_step_end = now

    def on_train_epoch_end(self) -> None:
        # Samples the data pipeline skipped (unmaskable, undecodable, too long...), per reason, so a run that
        # silently loses data shows it on the dashboard.
        counts = getattr(self.trainer.datamodule, "skip_counts", None) or {}
        for reason, n in counts.items():
            self.log(f"data/skipped/{reason}", float(n), sync_dist=True, reduce_fx="sum")
        # Peak memory of this process (the largest rank's, under sync): host RSS, and the GPU's when there is one.
        peak_rss_gib = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )  # ru_maxrss is in KiB on Linux
        self.log("perf/peak_host_memory_gib", peak_rss_gib, sync_dist=True, reduce_fx="max")
        if self.device.type == "cuda":
            peak_gpu_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.log("perf/peak_gpu_memory_gib", peak_gpu_gib, sync_dist=True, reduce_fx="max")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm)
        for group in optimizer.param_groups:
            self.log(f"lr/{group['name']}", group["lr"])

    # -- optimization ---------------------------------------------------------------------------------------
    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, from `max_steps` or the datamodule's manifest-based epoch size."""
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        datamodule = trainer.datamodule
        batches = getattr(datamodule, "train_batches_per_epoch", None)
        if batches is None:
            return int(trainer.estimated_stepping_batches)
        if trainer.limit_train_batches is not None and isinstance(trainer.limit_train_batches, int):
            batches = min(batches, trainer.limit_train_batches)
        steps_per_epoch = max(1, batches // trainer.accumulate_grad_batches)
        return steps_per_epoch * max(1, trainer.max_epochs or 1)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(
            self.model.named_parameters(),
            weight_decay=self.weight_decay,
            projector_lr=self.projector_lr,
            vision_tower_lr=self.vision_tower_lr,
        )
        optimizer = self.optimizer_factory(groups)
        total = self.total_optimizer_steps()
        warmup = max(1, math.ceil(self.warmup_ratio * total)) if self.warmup_ratio > 0 else 0

        def schedule(step: int) -> float:
            return warmup_cosine(step, total_steps=total, warmup_steps=warmup, min_lr_ratio=self.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["llava_lit_config"] = self.run_config
        if self.lora is not None:
            checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
            # The adapters' dropout draws from the global generators: a resume continues their streams.
            checkpoint[RNG_STATE_KEY] = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                checkpoint[RNG_STATE_KEY]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run keeps the metric history of the steps before its checkpoint.
        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.resume_from_step(int(checkpoint.get("global_step", 0)))
        if self.lora is not None:  # loaded non-strictly: check that it holds exactly what trains here
            expected = set(trainable_state_dict(self, self.state_dict()))
            if set(checkpoint["state_dict"]) != expected:
                missing = sorted(expected - set(checkpoint["state_dict"]))
                unexpected = sorted(set(checkpoint["state_dict"]) - expected)
                raise ValueError(
                    f"the checkpoint does not hold this LoRA run's trained parameters: missing {missing[:5]} "
                    f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
                )
            # Set at the first batch: creating the data loader's iterator after the restore draws a seed.
            self._resumed_rng_state = checkpoint.get(RNG_STATE_KEY)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        rng, self._resumed_rng_state = self._resumed_rng_state, None
        if not rng:
            return
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
