"""`python -m llava_lit.export`: a training checkpoint -> a transformers LLaVA folder (for vLLM, SGLang, TGI, Hub);
an AnyRes checkpoint (`model.anyres`) -> a LLaVA-NeXT folder.

    python -m llava_lit.export checkpoint=outputs/world/finetune/checkpoints/last.ckpt out=exported/world
    python -m llava_lit.export checkpoint=outputs/llava_v15_7b/finetune/checkpoints/last.ckpt \\
        out=exported/llava_v15_7b dtype=bfloat16 metrics=results/metrics.json
    python -m llava_lit.export checkpoint=outputs/llava_v15_7b_lora/finetune/checkpoints/last.ckpt \\
        out=exported/llava_v15_7b_lora_adapter lora_format=peft

The checkpoint may be a Lightning `.ckpt` file or an FSDP2 distributed-checkpoint directory; the model, tokenizer,
chat template and image handling are rebuilt from the run config stored in it. Settings are `key=value` overrides
of `conf/export.yaml` (Hydra; `--help` lists them with their docs, the fields of `ExportConfig`). After writing, the folder is loaded back with transformers and its logits
compared with ours (`verify=false` skips this for models too large to hold twice in memory).

A LoRA/QLoRA checkpoint is exported merged (the adapters folded into the base: the same transformers LLaVA folder as
a full finetune), or with `lora_format=peft` as the adapter alone in peft's format (`adapter_config.json`,
`adapter_model.safetensors`, naming its base LLM) beside `projector.safetensors`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llava_lit.atomic_files import atomic_directory
from llava_lit.checkpoint_reader import (
    HF_MODEL_TYPES,
    CheckpointKind,
    build_lora_run,
    classify_checkpoint,
    load_lightning_file,
)
from llava_lit.hydra_app import hydra_app
from llava_lit.inference.loading import load_for_inference
from llava_lit.interop.export_hf import export_hf_llava, verify_export
from llava_lit.interop.model_card import ModelCardInfo
from llava_lit.lora_loading import is_lora_run, write_peft_adapter
from llava_lit.model.dtypes import parse_dtype

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    """Settings of `python -m llava_lit.export` (the keys of `conf/export.yaml`)."""

    checkpoint: str
    """Lightning checkpoint file (`*.ckpt`) or FSDP2 distributed-checkpoint directory written by training."""
    out: str
    """Folder to write the transformers model into."""
    dtype: str | None = None
    """Cast weights to this dtype (`bfloat16`, `float16`, `float32`); None keeps the checkpoint's."""
    metrics: str | None = None
    """Optional JSON file of `{metric: value}` to list in the model card."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard."""
    verify: bool = True
    """Load the export with transformers and assert it gives our logits."""
    lora_format: str = "merged"
    """For a LoRA checkpoint: `merged` (a transformers LLaVA folder, adapters folded in) or `peft` (the adapter in
    peft's format plus `projector.safetensors`, to load over the base LLM)."""


def run_export(cfg: ExportConfig) -> Path:
    """Export `cfg.checkpoint` to `cfg.out` and return the folder.

    The export is written into a temporary sibling folder, verified there (`verify`), and only then takes the
    place of `cfg.out` (`atomic_directory`): a failed or unverified export leaves a previous one untouched. An
    existing `cfg.out` must be empty or a previous export (a LLaVA `config.json`), never another folder.
    """
    out = Path(cfg.out)
    if cfg.lora_format not in ("merged", "peft"):
        raise SystemExit(f"lora_format={cfg.lora_format!r}: expected merged or peft")
    if cfg.lora_format == "peft":
        return export_peft_adapter(Path(cfg.checkpoint), out)
    check_replaceable_export(out)
    bundle = load_for_inference(cfg.checkpoint)
    data = bundle.run_config.get("data") or {}
    metrics = json.loads(Path(cfg.metrics).read_text()) if cfg.metrics else {}
    card = ModelCardInfo(run_config=bundle.run_config, metrics=metrics, source=str(cfg.checkpoint))
    dtype = parse_dtype(cfg.dtype)
    with atomic_directory(out) as staging:
        export_hf_llava(
            bundle.model,
            bundle.tokenizer,
            staging,
            template=bundle.template,
            image_aspect=data.get("image_aspect", bundle.image_loader.aspect),
            dtype=dtype,
            card=card,
            max_shard_size=cfg.max_shard_size,
        )
        if cfg.verify:
            if dtype is not None:
                bundle.model.to(dtype)
            # bf16/fp16 weights compute in reduced precision on both sides: allow for op-order differences.
            tol = 1e-4 if dtype is None else 2e-2
            diff = verify_export(bundle.model, staging, atol=tol, rtol=tol)
            log.info("verified: transformers logits match llava_lit's (max abs diff %.3g)", diff)
    return out


def export_peft_adapter(checkpoint: Path, out: Path) -> Path:
    """Write a LoRA checkpoint's adapter in peft's format (and its projector) into a new or empty `out`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"out={out} exists and is not an empty folder")
    if classify_checkpoint(checkpoint) is not CheckpointKind.LIGHTNING_FILE:
        raise SystemExit(f"lora_format=peft: {checkpoint} is not a Lightning checkpoint file of a LoRA run")
    run_config, state_dict = load_lightning_file(checkpoint)
    if not is_lora_run(run_config):
        raise SystemExit(
            f"lora_format=peft: {checkpoint} is not a LoRA checkpoint (its run config has no module.lora)"
        )
    model, _ = build_lora_run(run_config, state_dict, source=str(checkpoint), merge=False)
    base = run_config.get("init_from") or run_config["model"]["language_model"]["name_or_path"]
    with atomic_directory(out) as staging:
        write_peft_adapter(model, staging, base=str(base))
    return out


def check_replaceable_export(out: Path) -> None:
    """Refuse an output folder that exists and is neither empty nor a previous export (it would be replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SystemExit(f"out={out} is a file, not a folder")
    if not any(out.iterdir()):
        return
    config = out / "config.json"
    try:
        is_export = json.loads(config.read_text()).get("model_type") in HF_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        is_export = False
    if not is_export:
        raise SystemExit(
            f"out={out} exists and is not a previous LLaVA export (no config.json with model_type "
            f"{' or '.join(HF_MODEL_TYPES)}): "
            "the export replaces the whole folder, so choose a new or empty folder"
        )


@hydra_app("export", schemas={"": ExportConfig})
def main(cfg: DictConfig) -> Path:
    """CLI entry point: `cfg` holds the keys of `ExportConfig` (type-checked against it); returns the folder."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings: ExportConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig), cfg))  # type: ignore[assignment]
    out = run_export(settings)
    print(f"exported to {out}")
    return out


if __name__ == "__main__":
    main()
