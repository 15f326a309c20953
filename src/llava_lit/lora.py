"""LoRA and QLoRA finetuning of the language model with peft (and bitsandbytes for the 4-bit base).

`module.lora.enabled=true` wraps `LlavaModel.language_model` with peft's `get_peft_model`: every linear layer of the
decoder (`target_modules`, by default all of them, which is what the official `find_all_linear_names` picks: q, k,
v, o, gate, up, down; never the LM head) gets a rank-`r` adapter, and only the adapters train in the LLM. The
projector (and with `stage.train_vision_tower=true` the vision tower) trains fully beside them, each with its own
learning rate (`module.projector_lr`, `module.vision_tower_lr`). `module.lora.quantize=nf4` loads the frozen base LLM
in 4-bit NF4 with double quantization through transformers' `BitsAndBytesConfig` (QLoRA); adapters, projector,
norms and embeddings stay in full precision.

A LoRA checkpoint holds only what trained (adapters, projector, optimizer); the frozen base is rebuilt from the run
config (the model node, or `init_from` when the run started there). `merge_adapters` folds the adapters into the
base so that inference and export see a plain transformers LLM. For a QLoRA run the adapters are merged into the
base weights rounded through NF4 exactly as training saw them (`round_through_nf4`), so the merged model computes
what was trained rather than the adapters over the unrounded base.

Refused: LoRA in the `align` stage (the LLM is frozen there), and LoRA under FSDP2 sharding (the adapter-only
checkpoint is written from an unsharded state dict; a 7B/13B LoRA fits one GPU per rank, so use `trainer=ddp`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANTIZE_MODES = (None, "nf4")
"""`module.lora.quantize` values: None (full-precision base, LoRA) or `nf4` (4-bit NormalFloat base, QLoRA)."""

BIAS_MODES = ("none", "all", "lora_only")
"""peft's `bias` settings: train no bias, every bias of the LLM, or the biases of the adapted layers."""

ADAPTER_MARKER = "lora_"
"""Substring of every adapter parameter name (`lora_A`, `lora_B`)."""


@dataclass
class LoraSettings:
    """The `module.lora` node of the training config."""

    enabled: bool = False
    """Train low-rank adapters on the LLM instead of all its weights (finetune stage only)."""
    r: int = 128
    """Adapter rank (LLaVA-1.5's `finetune_lora.sh`: 128)."""
    alpha: int = 256
    """Adapter scaling numerator: the update is `alpha / r * B @ A` (LLaVA-1.5: 256)."""
    dropout: float = 0.05
    """Dropout on the adapter's input (LLaVA-1.5: 0.05)."""
    target_modules: list[str] | str = "all-linear"
    """Module names that get adapters, or peft's `all-linear` (every linear layer of the LLM but the LM head)."""
    bias: str = "none"
    """Which LLM biases train: `none`, `all` or `lora_only` (those of the adapted layers)."""
    quantize: str | None = None
    """`nf4` loads the frozen base LLM in 4-bit NF4 through bitsandbytes (QLoRA); None keeps it in `model`'s dtype."""
    double_quant: bool = True
    """Quantize the NF4 block scales too (QLoRA's double quantization, ~0.4 bit a parameter saved)."""
    compute_dtype: str = "bfloat16"
    """dtype the 4-bit layers dequantize to for their matmuls (QLoRA: bf16)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further `peft.LoraConfig` arguments (e.g. `use_rslora: true`, `use_dora: true`)."""

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(
                f"module.lora.quantize={self.quantize!r}: expected one of {list(QUANTIZE_MODES)}"
            )
        if self.bias not in BIAS_MODES:
            raise ValueError(f"module.lora.bias={self.bias!r}: expected one of {list(BIAS_MODES)}")
        if self.r <= 0:
            raise ValueError(f"module.lora.r must be positive, got {self.r}")

    @classmethod
    def from_node(cls, node: Mapping[str, Any] | None) -> LoraSettings:
        """Settings from a (resolved) `module.lora` node; None or a missing node means disabled."""
        if not node:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(f"module.lora has unknown settings {unknown}; known: {sorted(known)}")
        values = dict(node)
        if isinstance(values.get("target_modules"), (list, tuple)):
            values["target_modules"] = [str(m) for m in values["target_modules"]]
        return cls(**values)


def settings_of_run(run_config: Mapping[str, Any]) -> LoraSettings:
    """The LoRA settings a run config records (disabled for runs without a `module.lora` node)."""
    return LoraSettings.from_node((run_config.get("module") or {}).get("lora"))


def check_supported(settings: LoraSettings, *, stage: str, sharded: bool, init_from: str | None) -> None:
    """Refuse the combinations that cannot work, with the reason."""
    if not settings.enabled:
        if settings.quantize is not None:
            raise ValueError("module.lora.quantize needs module.lora.enabled=true: a 4-bit base cannot train")
        return
    if stage != "finetune":
        raise ValueError(
            f"module.lora.enabled=true in stage={stage}: adapters train the LLM, which only the finetune stage "
            "trains (align trains the projector alone)"
        )
    if sharded:
        raise ValueError(
            "module.lora under FSDP2 (trainer=fsdp_*) is not supported: LoRA checkpoints hold the adapters "
            "from an unsharded state dict, and 4-bit bitsandbytes weights are not DTensor-shardable. A 7B/13B "
            "LoRA or QLoRA fits one GPU per rank: use trainer=ddp (or trainer=gpu)"
        )
    if settings.quantize is not None and init_from:
        raise ValueError(
            "module.lora.quantize with init_from: the 4-bit base is loaded from the LLM folder of the model "
            "config, while init_from brings its own full-precision weights. Export the init_from model "
            "(python -m llava_lit.export) and point model.language_model.name_or_path at its LLM, or train "
            "LoRA without quantize"
        )


def quantization_arguments(settings: LoraSettings) -> dict[str, Any] | None:
    """The arguments of transformers' `BitsAndBytesConfig` for the base LLM (plain data, so they pass through
    Hydra's instantiation), or None without quantization."""
    if settings.quantize is None:
        return None
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": settings.quantize,
        "bnb_4bit_use_double_quant": settings.double_quant,
        "bnb_4bit_compute_dtype": settings.compute_dtype,
    }


def peft_config(settings: LoraSettings) -> Any:
    """The `peft.LoraConfig` these settings describe."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias=settings.bias,
        task_type="CAUSAL_LM",
        **settings.extra,
    )


def add_adapters(model: nn.Module, settings: LoraSettings) -> None:
    """Wrap `model.language_model` (a `LlavaModel`'s) with peft LoRA adapters, in place.

    A 4-bit base is first prepared as peft does for k-bit training (non-quantized weights to fp32, input
    gradients enabled) without gradient checkpointing, which stays the trainer's choice.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    language_model = model.language_model
    if is_wrapped(language_model):
        raise ValueError("the language model already has adapters")
    if getattr(language_model, "is_loaded_in_4bit", False):
        language_model = prepare_model_for_kbit_training(language_model, use_gradient_checkpointing=False)
        keep_nf4_layout(language_model)
    model.language_model = get_peft_model(language_model, peft_config(settings))
    trainable = sum(p.numel() for p in model.language_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%d: %s adapter parameters", settings.r, settings.alpha, f"{trainable:,}")


def keep_nf4_layout(language_model: nn.Module) -> None:
    """Keep every 4-bit layer's weight in the layout it was quantized in.

    On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit` repacks its weight and quantization state in place for
    its CPU inference kernel the first time it runs in eval mode on an input without gradients, which is what
    validation does between training steps. A compiled decoder layer cannot trace that mutation (the run stops at
    its first validation), and the training steps after it would run on the inference layout. With the repacking
    off, training and validation compute with the same dequantized weights on every CPU.
    """
    import bitsandbytes as bnb

    for layer in language_model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def is_wrapped(language_model: nn.Module) -> bool:
    """Whether `language_model` carries peft adapters."""
    from peft import PeftModel

    return isinstance(language_model, PeftModel)


def freeze_base(model: nn.Module, settings: LoraSettings) -> None:
    """In the LLM of `model`, keep trainable only the adapters (and the biases `settings.bias` names)."""
    for name, param in model.language_model.named_parameters():
        trainable = ADAPTER_MARKER in name
        if name.endswith(".bias") and settings.bias == "all":
            trainable = True
        if name.endswith(".base_layer.bias") and settings.bias == "lora_only":
            trainable = True
        param.requires_grad_(trainable)


def trainable_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The entries of `state_dict` (`prefix` + `model`'s parameter names) whose parameters train."""
    trainable = {prefix + name for name, p in model.named_parameters() if p.requires_grad}
    kept = {k: v for k, v in state_dict.items() if k in trainable}
    if not kept:
        raise ValueError("no trainable parameter found in the state dict to save")
    return kept


def load_trained_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load an adapter-only state dict (`LlavaModel` keys) into a model with adapters: every key must exist, and
    every adapter parameter must be given."""
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    adapters = sorted(k for k in own if ADAPTER_MARKER in k)
    missing = [k for k in adapters if k not in state]
    if unexpected or missing:
        raise ValueError(
            f"{source} does not fit the LoRA model rebuilt from its run config: missing adapters {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    with torch.no_grad():
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
                )
            own[key].copy_(value)


def round_through_nf4(model: nn.Module, settings: LoraSettings) -> int:
    """Replace each adapted base weight of a full-precision LLM by its NF4 round trip (quantize, dequantize), as
    bitsandbytes stores it under `quantize=nf4` (blocks of 64, double quantization as set). Returns the count."""
    import bitsandbytes.functional as bnbf
    from peft.tuners.lora import LoraLayer

    count = 0
    with torch.no_grad():
        for module in model.language_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            weight = module.get_base_layer().weight
            packed, state = bnbf.quantize_4bit(
                weight.data.float().contiguous(),
                blocksize=64,
                compress_statistics=settings.double_quant,
                quant_type=settings.quantize,
            )
            weight.copy_(bnbf.dequantize_4bit(packed, state).to(weight.dtype))
            count += 1
    return count


def merge_adapters(model: nn.Module) -> None:
    """Fold the adapters into the base weights and unwrap `model.language_model` to the plain transformers LLM."""
    if not is_wrapped(model.language_model):
        raise ValueError("the language model has no adapters to merge")
    model.language_model = model.language_model.merge_and_unload()


def training_device(trainer_cfg: Mapping[str, Any]) -> str:
    """Where a quantized base is loaded: this process's GPU on a GPU trainer, else the CPU (bitsandbytes' CPU
    backend). bitsandbytes quantizes on the device the weights are loaded to."""
    import os

    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"
