"""The model card (`README.md`) written next to an exported model: where it came from and how to run it.

Everything in the card is read from the run config and the checkpoint, never typed by the user, so the card says
what was actually trained: base vision tower and LLM, data, stages, hyperparameters, and metrics when given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import LlavaConfig, LlavaNextConfig


@dataclass
class ModelCardInfo:
    """What the card reports about the model's origin (all optional)."""

    run_config: dict[str, Any] = field(default_factory=dict)
    """The resolved training config (`checkpoint["llava_lit_config"]`)."""
    global_step: int | None = None
    """Optimizer steps trained in the exported stage."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Evaluation results to list (name -> value)."""
    source: str | None = None
    """The checkpoint the export was made from."""


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def render_model_card(info: ModelCardInfo, *, config: LlavaConfig | LlavaNextConfig, template: str) -> str:
    """The Markdown model card for an exported model (LLaVA, or LLaVA-NeXT for an AnyRes model)."""
    cfg = info.run_config
    anyres = isinstance(config, LlavaNextConfig)
    architecture = "LlavaNextForConditionalGeneration" if anyres else "LlavaForConditionalGeneration"
    if anyres:
        images = (
            f"AnyRes tiles over the grid pinpoints {config.image_grid_pinpoints} (height, width): "
            f"{config.image_seq_length} tokens for the whole view, then the unpadded tile features with a newline "
            "per row, so the count depends on the image size"
        )
    else:
        images = f"{config.image_seq_length} tokens per image"
    vision = _get(cfg, "model.vision_tower.name_or_path") or config.vision_config.name_or_path or "unknown"
    llm = _get(cfg, "model.language_model.name_or_path") or config.text_config.name_or_path or "unknown"
    base_models = [m for m in (vision, llm) if m and m != "unknown"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- llava",
        *(["- llava_next"] if anyres else []),
        "- llava_lit",
    ]
    if base_models:
        lines += ["base_model:"] + [f"- {m}" for m in base_models]
    lines += ["---", "", f"# {'LLaVA-NeXT' if anyres else 'LLaVA'} model trained with llava_lit", ""]
    lines += [
        f"A LLaVA (Visual Instruction Tuning) vision-language model in transformers' `{architecture}` format.",
        "",
        "## Architecture",
        "",
        f"- Vision tower: `{vision}` (feature layer {config.vision_feature_layer}, "
        f"`{config.vision_feature_select_strategy}` features)",
        f"- Images: {images}",
        f"- Projector: Linear-GELU-Linear (`mlp2x_gelu`), bias {config.multimodal_projector_bias}",
        f"- Language model: `{llm}`",
        f"- Image token: `<image>` (id {config.image_token_index})",
        f"- Chat template: `{template}` (stored in the processor; `apply_chat_template` renders the training text)",
        "",
    ]
    stage = _get(cfg, "stage.name")
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    if cfg:
        lines += ["## Training", ""]
        if stage:
            lines.append(
                f"- Stage: `{stage}`" + (f", {info.global_step} optimizer steps" if info.global_step else "")
            )
        if data:
            shown = {
                k: v for k, v in data.items() if not isinstance(v, (dict, list)) and not k.startswith("_")
            }
            lines.append(f"- Data: `{json.dumps(shown, sort_keys=True)}`")
            for key in ("train", "shards", "sources"):
                if key in data:
                    lines.append(f"- Data sources ({key}): `{json.dumps(data[key], sort_keys=True)}`")
        hparams = {
            "global_batch_size": cfg.get("global_batch_size"),
            "micro_batch_size": cfg.get("micro_batch_size"),
            "optimizer": {k: v for k, v in (cfg.get("optimizer") or {}).items() if not k.startswith("_")},
            "module": cfg.get("module"),
            "seed": cfg.get("seed"),
        }
        lines.append(f"- Hyperparameters: `{json.dumps(hparams, sort_keys=True)}`")
        lines.append("")
    if info.metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in sorted(info.metrics.items())]
        lines.append("")
    if info.source:
        lines += [f"Exported from `{info.source}` by `python -m llava_lit.export`.", ""]
    lines += [
        "## Usage",
        "",
        "```python",
        f"from transformers import AutoProcessor, {architecture}",
        "",
        f'model = {architecture}.from_pretrained("PATH")',
        'processor = AutoProcessor.from_pretrained("PATH")',
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=image, text=prompt, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        "```",
        "",
    ]
    return "\n".join(lines)
