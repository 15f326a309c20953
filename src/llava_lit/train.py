"""`python -m llava_lit.train`: compose the config, build tokenizer, model, data and trainer, and fit one stage.

    python -m llava_lit.train stage=align
    python -m llava_lit.train stage=finetune trainer=fsdp_8gpu
    python -m llava_lit.train experiment=llava_v15_7b_align logger=wandb

The default config trains on the offline miniature world (`llava_lit.world`), whose data module builds it on
first use.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from llava_lit.checkpoint_reader import read_checkpoint
from llava_lit.checkpointing import resume_path
from llava_lit.cpu_bf16 import cpu_precision, has_native_bf16
from llava_lit.framework_noise import silence_framework_noise
from llava_lit.hydra_app import hydra_app
from llava_lit.lora import (
    LoraSettings,
    add_adapters,
    quantization_arguments,
    training_device,
)
from llava_lit.lora import check_supported as check_lora_supported
from llava_lit.model.llava import LlavaModelConfig
from llava_lit.module import LlavaLitModule
from llava_lit.packing import check_packing_attention
from llava_lit.preemption import preempted
from llava_lit.projector_io import load_projector
from llava_lit.sharding import ShardingConfig
from llava_lit.stages import StageFreezer
from llava_lit.tokenization import load_tokenizer, tokenizer_legacy

log = logging.getLogger(__name__)


def num_processes(trainer_cfg: DictConfig) -> int:
    """Number of training processes the trainer config asks for (devices per node x nodes)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        per_node = len(devices)
    elif str(devices) in ("auto", "-1") and trainer_cfg.get("accelerator") in ("gpu", "cuda"):
        per_node = max(1, torch.cuda.device_count())
    else:
        per_node = int(devices) if str(devices).isdigit() else 1
    return per_node * int(trainer_cfg.get("num_nodes", 1))


def gradient_accumulation(global_batch_size: int, micro_batch_size: int, processes: int) -> int:
    """Micro-batches per optimizer step so that micro x processes x accumulation == global batch."""
    per_step = micro_batch_size * processes
    if global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size x processes "
            f"= {micro_batch_size} x {processes} = {per_step}"
        )
    return global_batch_size // per_step


def fitted_micro_batch(global_batch_size: int, micro_batch_size: int, processes: int) -> int:
    """The micro-batch a run uses: `micro_batch_size` when it divides each process's share of the global batch,
    else the largest smaller one that does, so a recipe keeps its global batch on any device count.

    A global batch that does not split equally over the processes cannot be made to fit and is refused.
    """
    if global_batch_size % processes:
        raise ValueError(
            f"global_batch_size={global_batch_size} does not split equally over {processes} processes: "
            "choose a global batch that is a multiple of the number of devices x nodes"
        )
    per_process = global_batch_size // processes
    return max(m for m in range(1, min(micro_batch_size, per_process) + 1) if per_process % m == 0)


def fit_micro_batch(cfg: DictConfig) -> None:
    """Set `cfg.micro_batch_size` to `fitted_micro_batch` (logging the change) before anything is built."""
    processes = num_processes(cfg.trainer)
    micro = fitted_micro_batch(cfg.global_batch_size, cfg.micro_batch_size, processes)
    if micro != cfg.micro_batch_size:
        log.info(
            "micro_batch_size=%d does not divide global_batch_size=%d over %d processes: micro_batch_size=%d, "
            "%d accumulation steps",
            cfg.micro_batch_size,
            cfg.global_batch_size,
            processes,
            micro,
            gradient_accumulation(cfg.global_batch_size, micro, processes),
        )
        with open_dict(cfg):
            cfg.micro_batch_size = micro


def run_accumulation(cfg: DictConfig) -> int:
    """The run's micro-batches per optimizer step: what the Trainer accumulates and the data groups by length."""
    return gradient_accumulation(cfg.global_batch_size, cfg.micro_batch_size, num_processes(cfg.trainer))


def check_wandb(cfg: DictConfig) -> None:
    """Fail at once, with instructions, when W&B would need an account that is not configured."""
    uses_wandb = any("WandbLogger" in str(c.get("_target_", "")) for c in (cfg.get("logger") or {}).values())
    if not uses_wandb or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        hosts = {}
    if not any("wandb" in h or "coreweave" in h for h in hosts):
        raise SystemExit(
            "logger=wandb needs a W&B API key: run `wandb login` or set WANDB_API_KEY. "
            "To log without an account, set WANDB_MODE=offline (upload later with `wandb sync`)."
        )


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run configuration, without the `hydra` node (launcher state, absent under `@hydra.main`)."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }


def run_lora_settings(cfg: DictConfig) -> LoraSettings:
    """The run's `module.lora` settings (disabled when the node is absent)."""
    return LoraSettings.from_node(OmegaConf.to_container(cfg.module.get("lora") or {}, resolve=True))


def build_components(cfg: DictConfig) -> tuple[LlavaLitModule, L.LightningDataModule]:
    """Datamodule, tokenizer, model (with its starting weights) and LightningModule from the config.

    The datamodule comes first and its `prepare_data()` runs before the model is built: whatever files the run
    needs are made there (Lightning's contract for `prepare_data`: no state, safe to repeat; it runs again inside
    `fit`). A data module may thus produce the model's own files too, as the miniature world's does. Every
    process calls it; an implementation that writes files serialises concurrent calls itself.

    `init_from` starts from a whole released or exported LLaVA (official, llava-hf, or ours), read by
    `checkpoint_reader.read_checkpoint`: its model settings (read as checked data, never instantiated) replace
    `cfg.model`, so checkpoints of this run record what was actually trained, and the model is built once with
    the read weights as its parameters.
    """
    lora_settings = run_lora_settings(cfg)
    strategy = cfg.trainer.get("strategy")
    sharded = isinstance(strategy, Mapping) and "ModelParallel" in str(strategy.get("_target_", ""))
    check_lora_supported(lora_settings, stage=cfg.stage.name, sharded=sharded, init_from=cfg.get("init_from"))
    datamodule = instantiate(cfg.data, accumulate_grad_batches=run_accumulation(cfg))
    datamodule.prepare_data()
    pretrained = None
    if cfg.get("init_from"):
        pretrained = read_checkpoint(cfg.init_from)
        with open_dict(cfg):
            cfg.model = OmegaConf.create(pretrained.config.to_node())
        for key in ("template", "image_aspect"):
            theirs = getattr(pretrained, key)
            if theirs is not None and theirs != cfg.data[key]:
                log.warning(
                    "init_from=%s was trained with %s=%s, this run uses %s",
                    cfg.init_from,
                    key,
                    theirs,
                    cfg.data[key],
                )
    tokenizer_src = cfg.model.get("tokenizer_name_or_path") or cfg.model.language_model.name_or_path
    tokenizer = load_tokenizer(
        tokenizer_src, legacy=cfg.model.get("tokenizer_legacy"), model_max_length=cfg.data.max_length
    )
    with open_dict(cfg):  # checkpoints record the mode the ids were made with: a reload never flips it
        cfg.model.tokenizer_legacy = tokenizer_legacy(tokenizer)
    if pretrained is not None:
        model, _ = pretrained.build(tokenizer)  # built once, the read weights as its parameters
        del pretrained
    else:
        model = instantiate(
            cfg.model,
            tokenizer=tokenizer,
            quantization=quantization_arguments(lora_settings),
            quantized_device=training_device(cfg.trainer),
        )
    if cfg.init_projector and not cfg.ckpt_path:
        path = Path(cfg.init_projector)
        if not path.is_file():
            raise SystemExit(
                f"init_projector={path} does not exist. Run `python -m llava_lit.train stage=align` with the "
                "same run_name first, point init_projector at a projector file (ours or an official "
                "mm_projector.bin), or pass init_projector=null to start from a fresh projector."
            )
        load_projector(model.projector, path)
    if lora_settings.enabled:  # after the starting weights: the adapters start at zero over them
        add_adapters(model, lora_settings)
    if cfg.data.get("packing"):  # refused here, before any data is read, rather than at the first step
        check_packing_attention(model.language_model.config._attn_implementation)
    tower = model.vision_tower
    if (model.tile_layout is not None) != (datamodule.image_aspect == "anyres"):
        raise SystemExit(
            f"data.image_aspect={datamodule.image_aspect} with model.anyres="
            f"{'set' if model.tile_layout is not None else 'null'}: AnyRes tiling needs both "
            "(data.image_aspect=anyres and model.anyres settings, as experiment=llava_next_* sets them), "
            "a one-view model neither"
        )
    datamodule.attach_model_inputs(
        tokenizer=tokenizer,
        image_processor=tower.image_processor,
        num_image_tokens=tower.num_image_tokens,
        tile_layout=model.tile_layout,
    )
    module_cfg = OmegaConf.to_container(cfg.module, resolve=True)
    module = LlavaLitModule(
        model,
        instantiate(cfg.optimizer),
        weight_decay=module_cfg["weight_decay"],
        projector_lr=module_cfg["projector_lr"],
        vision_tower_lr=module_cfg.get("vision_tower_lr"),
        lora=lora_settings,
        warmup_ratio=module_cfg["warmup_ratio"],
        min_lr_ratio=module_cfg["min_lr_ratio"],
        sharding=ShardingConfig(**module_cfg["sharding"]),
        compile_blocks=module_cfg["compile_blocks"],
        fused_loss=module_cfg["fused_loss"],
        peak_tflops=module_cfg["peak_tflops"],
        run_config=run_config(cfg),
    )
    return module, datamodule


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Lightning Trainer with the stage's freezer, the configured callbacks and loggers.

    A callback set to null (`++callbacks.<name>=null`) is left out.
    """
    lora_settings = run_lora_settings(cfg)
    callbacks: list[L.Callback] = [
        StageFreezer(cfg.stage.name, cfg.stage.train_vision_tower, lora=lora_settings)
    ]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, accumulate_grad_batches=run_accumulation(cfg)
    )


def set_cpu_threads(cfg: DictConfig) -> int:
    """Size torch's intra-op thread pool for CPU training and return it.

    On a CPU run the data workers and the training process share the cores; oversubscribing them makes
    every matmul spin-wait (measured on 2 cores: 1.9 s per step with 2 threads beside 2 busy workers, 22 ms
    with 1). `cpu_threads: null` leaves one core per data worker, at least one for training.
    """
    threads = cfg.get("cpu_threads")
    if threads is None:
        if cfg.trainer.get("accelerator") != "cpu":
            return torch.get_num_threads()
        per_process_cores = (os.cpu_count() or 1) // max(1, num_processes(cfg.trainer))
        threads = max(1, per_process_cores - int(cfg.data.get("num_workers", 0)))
    torch.set_num_threads(int(threads))
    return int(threads)


def resolve_cpu_precision(cfg: DictConfig) -> None:
    """Fill in a CPU run's unset `trainer.precision` from the CPU (`cpu_bf16.cpu_precision`), and warn when bf16
    is asked for on a CPU that only emulates it."""
    if cfg.trainer.get("accelerator") != "cpu":
        return
    requested = cfg.trainer.get("precision")
    with open_dict(cfg):
        cfg.trainer.precision = cpu_precision(requested)
    if requested is None:
        log.info(
            "trainer.precision: %s (%s bf16 on this CPU)",
            cfg.trainer.precision,
            "native" if has_native_bf16() else "no native",
        )
    elif str(requested).startswith("bf16") and not has_native_bf16():
        log.warning(
            "trainer.precision=%s on a CPU without AMX or AVX512-BF16: bf16 is emulated here and slower than "
            "fp32; leave trainer.precision unset (null) to get 32-true",
            requested,
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one stage; returns the final logged metrics.

    A preemption signal ends it with `preemption.Preempted` (exit status 128 + signal) after a checkpoint; a
    failed checkpoint save with `checkpointing.CheckpointSaveError`, the previous checkpoint intact.
    """
    silence_framework_noise(bool(cfg.get("verbose", False)))
    L.seed_everything(cfg.seed, workers=True)
    log.info("torch threads: %d", set_cpu_threads(cfg))
    resolve_cpu_precision(cfg)
    fit_micro_batch(cfg)
    check_wandb(cfg)
    with open_dict(cfg):  # recorded in checkpoints as the checkpoint actually resumed from
        cfg.ckpt_path = resume_path(cfg.ckpt_path, Path(cfg.paths.output_dir) / "checkpoints")
    module, datamodule = build_components(cfg)
    trainer = build_trainer(cfg)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except SIGTERMException as stop:
        raise preempted(trainer) from stop
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra_app("train", schemas={"model": LlavaModelConfig, "module.sharding": ShardingConfig})
def main(cfg: DictConfig) -> None:
    metrics = train(cfg)
    log.info("final metrics: %s", json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
