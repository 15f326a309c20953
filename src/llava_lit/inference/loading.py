"""Loading a model for inference, with everything needed to prompt it: tokenizer, template, image handling.

Every source goes through the one checkpoint reader (`checkpoint_reader.read_checkpoint`: Lightning `.ckpt` files,
FSDP2 directories, exported, llava-hf and official folders, hub ids) and the one loader
(`PretrainedLlava.build`, weights held once). A training checkpoint carries its resolved run config: its `model`
node rebuilds the architecture and names the tokenizer, its `data` node names the chat template, the image aspect
mode and the training length. Nothing is inferred from a folder name (the official loader's template and
model-class choice by directory name is a known source of silent errors). Imported folders record their image
handling, and our exports record their chat template (the Jinja equals one of ours, with any replaced system
prompt read back); official and llava-hf folders do not, so the template then comes from the caller
(`template`), defaulting to `vicuna_v1`, LLaVA-1.5's, with a log line saying so.

The load settings shared by `predict`, `chat`, `serve` and `eval` are `load_settings.LoadSettings`.
With `load_in_4bit`/`load_in_8bit` the language model's linear layers are quantized by bitsandbytes; the vision
tower and the projector stay in full precision (quantizing the projector is what breaks the official 4-bit
loader's projector weights).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.checkpoint_reader import read_checkpoint
from llava_lit.conversation import ChatTemplate, get_template
from llava_lit.images import ImageLoader, TiledImage
from llava_lit.inference.generation import Generator
from llava_lit.inference.prompts import Prompt, PromptError, build_prompt
from llava_lit.interop.pretrained import PretrainedLlava
from llava_lit.load_settings import LoadSettings
from llava_lit.model import LlavaModel
from llava_lit.model.dtypes import parse_dtype

log = logging.getLogger(__name__)

DEFAULT_IMPORTED_TEMPLATE = "vicuna_v1"
"""Template for an imported folder that does not record one: LLaVA-1.5 (official and llava-hf) trained with it."""


@dataclass
class InferenceBundle:
    """A model ready to answer, with the tokenizer, template and image preprocessing it was trained with."""

    model: LlavaModel
    """The model, in eval mode, on its device."""
    tokenizer: PreTrainedTokenizerBase
    """The training tokenizer (`<image>` and pad added)."""
    template: ChatTemplate
    """The chat template of the training data (`data.template`, with `data.system_prompt` if it set one)."""
    image_loader: ImageLoader
    """Bytes -> Tensor[3, H, W] (AnyRes: a `TiledImage`) with the training aspect mode and the vision tower's
    processor."""
    max_length: int | None
    """Longest sequence (prompt + answer) to allow: the language model's position limit."""
    model_id: str
    """Name reported in answer files and by the server (`run_name/stage` unless overridden)."""
    run_config: dict[str, Any] = field(default_factory=dict)
    """The resolved training run config the model was rebuilt from."""

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image."""
        return self.model.num_image_tokens

    def prompt(
        self, turns: Sequence[Mapping[str, str]], images: Sequence[torch.Tensor | TiledImage] = ()
    ) -> Prompt:
        """A `Prompt` for `turns` (ending with a user turn) with `images` as `image_loader` gives them
        ([3, H, W] each, or `TiledImage`s for an AnyRes model)."""
        tiled = [image for image in images if isinstance(image, TiledImage)]
        if (self.model.tile_layout is not None) != bool(tiled) and images:
            raise PromptError(
                "an AnyRes model reads TiledImages (from its bundle's image_loader), a one-view model tensors"
            )
        if tiled:
            if len(tiled) != len(images):
                raise PromptError("all images of a prompt must be TiledImages for an AnyRes model")
            return build_prompt(
                turns,
                tokenizer=self.tokenizer,
                template=self.template,
                num_image_tokens=[self.model.image_tokens(*image.size) for image in tiled],
                pixel_values=torch.cat([image.pixels for image in tiled]),  # [sum of tiles, 3, H, W]
                image_sizes=torch.tensor([image.size for image in tiled], dtype=torch.long),  # [n, 2]
            )
        pixel_values = torch.stack(list(images)) if images else None
        return build_prompt(
            turns,
            tokenizer=self.tokenizer,
            template=self.template,
            num_image_tokens=self.num_image_tokens,
            pixel_values=pixel_values,
        )

    def generator(self) -> Generator:
        """A `Generator` over this bundle's model, tokenizer and template."""
        return Generator(self.model, self.tokenizer, self.template, max_length=self.max_length)


def bundle_from_model(
    model: LlavaModel,
    tokenizer: PreTrainedTokenizerBase,
    run_config: Mapping[str, Any],
    *,
    model_id: str | None = None,
) -> InferenceBundle:
    """Wrap an already built model (e.g. the one being trained) into a bundle, reading the rest from the config."""
    data = run_config.get("data") or {}
    if "template" not in data:
        raise ValueError("the run config has no data.template: the chat template cannot be chosen")
    stage = (run_config.get("stage") or {}).get("name")
    default_id = "/".join(str(p) for p in (run_config.get("run_name"), stage) if p) or "llava_lit"
    lm_config = model.language_model.config
    # The longer of the LLM's configured positions and the sequences it was trained on: rotary positions extend,
    # and a run trained past its config's limit (data.max_length) has learned those positions.
    limits = [getattr(lm_config, "max_position_embeddings", None), data.get("max_length")]
    max_length = max((int(n) for n in limits if n), default=None)
    return InferenceBundle(
        model=model,
        tokenizer=tokenizer,
        template=get_template(data["template"], system=data.get("system_prompt")),
        image_loader=ImageLoader(
            model.vision_tower.image_processor,
            aspect=data.get("image_aspect", "pad"),
            tile_layout=model.tile_layout,
        ),
        max_length=int(max_length) if max_length else None,
        model_id=model_id or default_id,
        run_config=dict(run_config),
    )


def load_for_inference(
    path: str | Path,
    settings: LoadSettings | None = None,
    *,
    device: str | torch.device = "cpu",
    model_id: str | None = None,
    **overrides: Any,
) -> InferenceBundle:
    """Load any checkpoint `read_checkpoint` reads as an `InferenceBundle`.

    Args:
        path: the checkpoint file, distributed-checkpoint directory, model folder or hub id.
        settings: how to load it (dtype, quantization, attention, template); default `LoadSettings()`.
        device: where the model runs; `auto` is CUDA when available, else the CPU.
        model_id: the name reported in outputs; default `run_name/stage` from the run config, the folder name for
            an imported model.
        **overrides: `LoadSettings` fields replacing those of `settings` (e.g. `load_in_4bit=True`).
    """
    settings = dataclasses.replace(settings or LoadSettings(), **overrides)
    if settings.load_in_4bit and settings.load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    source = read_checkpoint(path).with_attention(settings.attn_implementation)
    for note in source.notes:
        log.info("%s: %s", path, note)
    run_config = _run_config(source, str(path), _chosen_template(source, str(path), settings.template))
    model, tokenizer = source.build()
    return _finish(
        model,
        tokenizer,
        run_config,
        device=device,
        torch_dtype=parse_dtype(settings.dtype),
        load_in_4bit=settings.load_in_4bit,
        load_in_8bit=settings.load_in_8bit,
        model_id=model_id,
    )


def _chosen_template(source: PretrainedLlava, path: str, template: str | None) -> str:
    """The chat template to prompt with: the recorded one (a different `template` is refused), else `template`,
    else `DEFAULT_IMPORTED_TEMPLATE`."""
    if source.template is not None:
        if template is not None and template != source.template:
            if source.kind == "llava_lit":
                raise ValueError(
                    f"{path} was trained with template {source.template!r} (its run config's data.template), "
                    f"not {template!r}"
                )
            raise ValueError(
                f"{path} records the chat template {source.template!r} (its chat_template), not {template!r}"
            )
        return source.template
    if template is not None:
        log.info("%s records no chat template: using %r as asked", path, template)
        return template
    log.info(
        "%s (%s checkpoint) records no chat template: using %r, LLaVA-1.5's; pass template= if it was trained "
        "with another",
        path,
        source.kind,
        DEFAULT_IMPORTED_TEMPLATE,
    )
    return DEFAULT_IMPORTED_TEMPLATE


def _run_config(source: PretrainedLlava, path: str, template: str) -> dict[str, Any]:
    """The run config the bundle reports: a training checkpoint's own, or one holding what an import records."""
    if source.run_config is not None:
        return source.run_config
    aspect = source.image_aspect or "pad"
    log.info("loaded %s (%s checkpoint): template %s, image aspect %s", path, source.kind, template, aspect)
    return {
        "run_name": Path(path).name or path,
        "model": source.config.to_node(),
        "data": {"template": template, "image_aspect": aspect, "system_prompt": source.system_prompt},
        "imported": {"source": path, "kind": source.kind},
    }


def _finish(
    model: LlavaModel,
    tokenizer: PreTrainedTokenizerBase,
    run_config: dict[str, Any],
    *,
    device: str | torch.device,
    torch_dtype: torch.dtype | None,
    load_in_4bit: bool,
    load_in_8bit: bool,
    model_id: str | None,
) -> InferenceBundle:
    """Cast, quantize and place the built model, and wrap it into a bundle."""
    if torch_dtype is not None:
        model.to(torch_dtype)
    if load_in_4bit or load_in_8bit:
        model.language_model = quantize_language_model(
            model.language_model, bits=4 if load_in_4bit else 8, device=device, compute_dtype=torch_dtype
        )
        model.vision_tower.to(device)
        model.projector.to(device=device, dtype=torch.float32)
    else:
        model.to(device)
    model.eval()
    return bundle_from_model(model, tokenizer, run_config, model_id=model_id)


def quantize_language_model(
    language_model: torch.nn.Module,
    *,
    bits: int,
    device: str | torch.device,
    compute_dtype: torch.dtype | None,
) -> torch.nn.Module:
    """Re-load `language_model` with its linear layers quantized by bitsandbytes (4-bit NF4 or 8-bit).

    The model goes through `save_pretrained` into a temporary folder and back through `from_pretrained` with a
    `BitsAndBytesConfig`: transformers' own quantized loading path, the one bitsandbytes is tested with. The
    output head stays unquantized (transformers' default), as do the vision tower and projector (not passed).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        )
    elif bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    with tempfile.TemporaryDirectory() as tmp:
        language_model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, device_map={"": str(device)}, dtype=compute_dtype or torch.float32
        )
    quantized.eval()
    log.info("quantized the language model to %d bit (bitsandbytes)", bits)
    return quantized
