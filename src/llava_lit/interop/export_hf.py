"""Export a `LlavaModel` to a transformers LLaVA folder (`LlavaForConditionalGeneration` + `LlavaProcessor`), or
an AnyRes model to a LLaVA-NeXT folder (`LlavaNextForConditionalGeneration` + `LlavaNextProcessor`).

The weights and config come from `model.hf_interop.to_hf_llava_state_dict` (the one mapping between our module
layout and transformers'), for AnyRes through `interop.llava_next`. This module adds what a usable folder needs
around them: a key check against the transformers model (so loading reports no missing or unexpected keys), sharded
safetensors, the tokenizer with `<image>` and a chat template generated from the training template, an image
processor that repeats the training image handling (`pad` -> `do_pad`; AnyRes tiles -> `LlavaNextImageProcessor`
with the grid pinpoints), the generation config and a model card.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from transformers import (
    AutoConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from llava_lit.atomic_files import atomic_write_text
from llava_lit.constants import IMAGE_TOKEN
from llava_lit.conversation import ChatTemplate, get_template
from llava_lit.interop.chat_template import to_jinja
from llava_lit.interop.llava_next import hf_llava_next_image_processor, to_hf_llava_next_state_dict
from llava_lit.interop.model_card import ModelCardInfo, render_model_card
from llava_lit.model.hf_interop import to_hf_llava_state_dict
from llava_lit.model.llava import LlavaModel
from llava_lit.tokenization import tokenizer_legacy

log = logging.getLogger(__name__)

ASPECTS = ("pad", "crop", "resize")
"""The image aspects of a one-view model; an AnyRes model exports with `anyres`."""
ANYRES_ASPECT = "anyres"
"""The image aspect of an AnyRes model (`data.image_aspect`), exported as a `LlavaNextImageProcessor`."""


def hf_image_processor(clip_processor: Any, aspect: str) -> LlavaImageProcessor:
    """A `LlavaImageProcessor` doing what training did: `aspect` handling, then the tower's CLIP preprocessing.

    `pad` pads to a square filled with the 8-bit mean colour before resizing (LLaVA-1.5's `expand2square`, bit-exact
    with `images.ImageLoader`); `crop` is the plain CLIP shortest-edge resize + centre crop; `resize` stretches to
    the crop size (torchvision's bicubic, where training used PIL's: close, not bit-exact).
    """
    if aspect not in ASPECTS:
        raise ValueError(f"image aspect must be one of {ASPECTS}, got {aspect!r}")
    crop = dict(clip_processor.crop_size)
    kwargs: dict[str, Any] = {
        "size": dict(clip_processor.size),
        "crop_size": crop,
        "resample": clip_processor.resample,
        "image_mean": list(clip_processor.image_mean),
        "image_std": list(clip_processor.image_std),
        "do_center_crop": bool(clip_processor.do_center_crop),
        "do_rescale": bool(clip_processor.do_rescale),
        "rescale_factor": clip_processor.rescale_factor,
        "do_normalize": bool(clip_processor.do_normalize),
        "do_convert_rgb": True,
        "do_pad": aspect == "pad",
    }
    if aspect == "resize":
        kwargs["size"] = {"height": crop["height"], "width": crop["width"]}
        kwargs["do_center_crop"] = False
    return LlavaImageProcessor(**kwargs)


def transformers_class(config: PreTrainedConfig) -> type[PreTrainedModel]:
    """The transformers model class of an exported config: LLaVA-NeXT for AnyRes, else LLaVA."""
    if isinstance(config, LlavaNextConfig):
        return LlavaNextForConditionalGeneration
    if isinstance(config, LlavaConfig):
        return LlavaForConditionalGeneration
    raise TypeError(f"not a LLaVA config: {type(config).__name__}")


def check_against_transformers(config: LlavaConfig | LlavaNextConfig, state: dict[str, torch.Tensor]) -> None:
    """Raise unless `state` has exactly the keys and shapes of the transformers model of `config`
    (`LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration`).

    The transformers model is built on the meta device (no memory). Tied output embeddings may be absent.
    """
    model_class = transformers_class(config)
    with torch.device("meta"):
        reference = model_class(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    tied = set(getattr(reference, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = sorted(k for k in expected if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(k for k in state if k in expected and tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"the exported weights do not fit transformers' {model_class.__name__}:\n"
            f"  missing: {missing[:10]}\n  unexpected: {unexpected[:10]}\n"
            f"  wrong shape: {[(k, tuple(state[k].shape), expected[k]) for k in wrong[:10]]}"
        )


def export_hf_llava(
    model: LlavaModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    template: str | ChatTemplate,
    image_aspect: str,
    dtype: torch.dtype | None = None,
    card: ModelCardInfo | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write `model` as a transformers LLaVA folder (LLaVA-NeXT for an AnyRes model) and return its path.

    Args:
        model: the trained model (CPU; a CLIP tower and an `mlp2x_gelu` projector, else `ValueError`; AnyRes
            with `unpad` and `newline`, the only layout transformers has).
        tokenizer: the training tokenizer (from `tokenization.load_tokenizer`, holding `<image>`).
        out_dir: the folder to write (created; existing files of the same names are overwritten).
        template: the chat template the model was trained with (`data.template`), or its name.
        image_aspect: the training image handling (`data.image_aspect`: `pad`, `crop`, `resize`; `anyres` for,
            and only for, an AnyRes model).
        dtype: cast floating weights to this dtype (e.g. `torch.bfloat16`); None keeps them as trained.
        card: what the model card says about the model's origin; None writes a minimal card.
        max_shard_size: largest safetensors shard.
    """
    if isinstance(template, str):
        template = get_template(template)
    anyres = model.tile_layout is not None
    if anyres != (image_aspect == ANYRES_ASPECT):
        raise ValueError(
            f"image_aspect={image_aspect!r} for {'an AnyRes' if anyres else 'a one-view'} model: the 'anyres' "
            "aspect goes with, and only with, a model that has model.anyres set"
        )
    config, state = to_hf_llava_next_state_dict(model) if anyres else to_hf_llava_state_dict(model)
    check_against_transformers(config, state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        config.dtype = dtype
        config.text_config.dtype = dtype
        config.vision_config.dtype = dtype
    else:
        config.dtype = next(iter(v for v in state.values() if v.is_floating_point())).dtype
    # Tokens the model needs from the config alone (generate() and servers read these, not the tokenizer).
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.architectures = [transformers_class(config).__name__]
    save_torch_state_dict(
        {k: v.contiguous() for k, v in state.items()},
        out,
        max_shard_size=max_shard_size,
        metadata={"format": "pt"},
    )
    config.save_pretrained(out)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(out)

    _processor(model, tokenizer, template, image_aspect, config).save_pretrained(out)
    record_tokenizer_legacy(out, tokenizer)
    (out / "README.md").write_text(
        render_model_card(card or ModelCardInfo(), config=config, template=template.name)
    )
    log.info("exported transformers %s to %s (%d tensors)", config.model_type, out, len(state))
    return out


def _processor(
    model: LlavaModel,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    image_aspect: str,
    config: LlavaConfig | LlavaNextConfig,
) -> ProcessorMixin:
    """The export's processor: `LlavaProcessor`, or `LlavaNextProcessor` for an AnyRes model (its image
    processor tiles as `model.tile_layout` does, and it expands `<image>` to `model.image_tokens(h, w)`)."""
    tower = model.vision_tower
    if model.tile_layout is None:
        processor_class: type[ProcessorMixin] = LlavaProcessor
        image_processor = hf_image_processor(tower.image_processor, image_aspect)
    else:
        processor_class = LlavaNextProcessor
        image_processor = hf_llava_next_image_processor(tower.image_processor, model.tile_layout)
    return processor_class(
        image_processor=image_processor,
        tokenizer=_export_tokenizer(tokenizer),
        patch_size=int(tower.backbone.config.patch_size),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=to_jinja(template),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token; "default" strategy drops it again
    )


def record_tokenizer_legacy(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write the tokenizer's `legacy` mode into the folder's `tokenizer_config.json`.

    transformers 5 does not save it, and reads a folder without it as non-legacy while transformers 4.37 and
    llava_lit read it as legacy: with the key written, every loader tokenizes the export as it was trained.
    """
    legacy = tokenizer_legacy(tokenizer)
    path = folder / "tokenizer_config.json"
    if legacy is None or not path.is_file():
        return
    config = json.loads(path.read_text())
    config["legacy"] = legacy
    atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _export_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of the training tokenizer set up for generation: left padding (the training one stays as is)."""
    exported = copy.deepcopy(tokenizer)
    # Batched generation appends new tokens on the right, so prompts are padded on the left.
    exported.padding_side = "left"
    exported.init_kwargs["padding_side"] = "left"  # what save_pretrained writes
    return exported


def verify_export(model: LlavaModel, out_dir: str | Path, *, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Load the export with transformers and check it computes our logits; returns the max abs difference.

    Raises when transformers reports missing/unexpected keys or the logits differ beyond the tolerance. The input
    is a fixed prompt of one image (seeded random pixels) between text tokens, so every module is exercised; for an
    AnyRes model the image is wide and off the pinpoints' ratios, so its tiles, unpadding and newlines all count.
    """
    model_class = transformers_class(AutoConfig.from_pretrained(str(out_dir)))
    hf, info = model_class.from_pretrained(str(out_dir), output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise ValueError(f"transformers loaded {out_dir} with problems: {bad} {info.get('error_msgs')}")
    hf.eval()
    generator = torch.Generator().manual_seed(0)
    size = hf.config.vision_config.image_size
    layout = model.tile_layout
    if layout is None:
        views, n_tokens, extra = 1, hf.config.image_seq_length, {}
    else:
        height, width = layout.base // 2 + 1, 2 * layout.base - 3  # (height, width) of the checked image
        views, n_tokens = layout.num_tiles(height, width), layout.num_tokens(height, width)
        extra = {"image_sizes": torch.tensor([[height, width]])}
    pixel_values = torch.randn(views, 3, size, size, generator=generator)  # [views, 3, H, W]
    image_id = hf.config.image_token_id
    text = torch.randint(3, min(hf.config.text_config.vocab_size, 32000), (12,), generator=generator).tolist()
    ids = torch.tensor([[1, *text[:4], *([image_id] * n_tokens), *text[4:]]])
    mask = torch.ones_like(ids)
    dtype = next(hf.parameters()).dtype
    with torch.no_grad():
        theirs = hf(
            input_ids=ids, attention_mask=mask, pixel_values=pixel_values.to(dtype), **extra
        ).logits.float()
        ours = model(ids, mask, pixel_values.to(model.vision_tower.dtype), **extra).logits.float()
    torch.testing.assert_close(theirs, ours, atol=atol, rtol=rtol)
    return float((theirs - ours).abs().max())
