"""`python -m llava_lit.export`: a training checkpoint -> a transformers LLaVA folder (for vLLM, SGLang, TGI, Hub).

    python -m llava_lit.export checkpoint=outputs/world/finetune/checkpoints/last.ckpt out=exported/world
    python -m llava_lit.export checkpoint=outputs/llava_v15_7b/finetune/checkpoints/last.ckpt \\
        out=exported/llava_v15_7b dtype=bfloat16 metrics=results/metrics.json

The checkpoint may be a Lightning `.ckpt` file or an FSDP2 distributed-checkpoint directory; the model, tokenizer,
chat template and image handling are rebuilt from the run config stored in it. Settings are `key=value` overrides
of `conf/export.yaml` (Hydra; `--help` lists them with their docs, the fields of `ExportConfig`). After writing, the folder is loaded back with transformers and its logits
compared with ours (`verify=false` skips this for models too large to hold twice in memory).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llava_lit.atomic_files import atomic_directory
from llava_lit.hydra_app import hydra_app
from llava_lit.inference.loading import load_for_inference
from llava_lit.interop.export_hf import export_hf_llava, verify_export
from llava_lit.interop.model_card import ModelCardInfo
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


def run_export(cfg: ExportConfig) -> Path:
    """Export `cfg.checkpoint` to `cfg.out` and return the folder.

    The export is written into a temporary sibling folder, verified there (`verify`), and only then takes the
    place of `cfg.out` (`atomic_directory`): a failed or unverified export leaves a previous one untouched. An
    existing `cfg.out` must be empty or a previous export (a LLaVA `config.json`), never another folder.
    """
    out = Path(cfg.out)
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
        is_export = json.loads(config.read_text()).get("model_type") == "llava"
    except (OSError, ValueError, AttributeError):
        is_export = False
    if not is_export:
        raise SystemExit(
            f"out={out} exists and is not a previous LLaVA export (no config.json with model_type llava): "
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
