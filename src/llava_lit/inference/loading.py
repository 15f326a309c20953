"""Loading a trained model for inference, with everything needed to prompt it taken from its saved run config.

A training checkpoint carries `llava_lit_config`, the resolved run config: its `model` node rebuilds the
architecture and names the tokenizer, its `data` node names the chat template, the image aspect mode and the
training length. Nothing is inferred from a folder name (the official loader's template and model-class choice
by directory name is a known source of silent errors). The stored config is data: it is checked field by field
(`LlavaModelConfig.from_data`, `checked_data_settings`) and the model is built by fixed code, so a checkpoint
that names a `_target_` is refused, never run (`llava_lit.untrusted`). Two training checkpoint forms are read:

- a Lightning checkpoint file (`*.ckpt`): weights under `state_dict` as `model.<LlavaModel key>`;
- an FSDP2 distributed checkpoint directory (`.metadata`, shards, `meta.pt`): the run config comes from
  `meta.pt` and only the model weights are read from the shards, straight into the rebuilt model (the optimizer
  state, twice the model's size, is never loaded).

Models from elsewhere go through `interop.pretrained.load_pretrained_llava`, which rebuilds them from what their
`config.json` records: a transformers LLaVA folder (what `python -m llava_lit.export` writes, or `llava-hf/*`), an
official LLaVA checkpoint folder, or a hub id of either. Such a folder records its image handling, and our exports
record their chat template (the Jinja equals one of ours, with any replaced system prompt read back); official
and llava-hf folders do not, so the template then comes from the caller (`template=`), defaulting to
`vicuna_v1`, LLaVA-1.5's, with a log line saying so.

With `load_in_4bit`/`load_in_8bit` the language model's linear layers are quantized by bitsandbytes; the vision
tower and the projector stay in full precision (quantizing the projector is what breaks the official 4-bit
loader's projector weights).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.conversation import TEMPLATES, ChatTemplate, get_template
from llava_lit.images import ASPECT_MODES, ImageLoader
from llava_lit.inference.generation import Generator
from llava_lit.inference.prompts import Prompt, build_prompt
from llava_lit.lora_loading import build_lora_model, is_lora_run
from llava_lit.model import LlavaModel, LlavaModelConfig
from llava_lit.model.dtypes import parse_dtype
from llava_lit.tokenization import load_tokenizer
from llava_lit.untrusted import ConfigRefused, check_plain_data

log = logging.getLogger(__name__)

DEFAULT_IMPORTED_TEMPLATE = "vicuna_v1"
"""Template for an imported folder that does not record one: LLaVA-1.5 (official and llava-hf) trained with it."""

MODULE_PREFIX = "model."
"""`LlavaLitModule` holds the `LlavaModel` as `self.model`, so checkpoint keys start with this."""

DCP_META_FILE = "meta.pt"
"""Lightning's file for the non-tensor part of a distributed checkpoint (holds `llava_lit_config`)."""


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
    """Bytes -> FloatTensor[3, H, W] with the training aspect mode and the vision tower's processor."""
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

    def prompt(self, turns: Sequence[Mapping[str, str]], images: Sequence[torch.Tensor] = ()) -> Prompt:
        """A `Prompt` for `turns` (ending with a user turn) with preprocessed `images` ([3, H, W] each)."""
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
    max_length = getattr(lm_config, "max_position_embeddings", None) or data.get("max_length")
    return InferenceBundle(
        model=model,
        tokenizer=tokenizer,
        template=get_template(data["template"], system=data.get("system_prompt")),
        image_loader=ImageLoader(model.vision_tower.image_processor, aspect=data.get("image_aspect", "pad")),
        max_length=int(max_length) if max_length else None,
        model_id=model_id or default_id,
        run_config=dict(run_config),
    )


def load_for_inference(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    model_id: str | None = None,
    template: str | None = None,
) -> InferenceBundle:
    """Load a checkpoint as an `InferenceBundle`: a training checkpoint (Lightning `.ckpt` file or FSDP2
    directory), a transformers LLaVA folder (our exports, `llava-hf/*`), an official LLaVA folder, or a hub id.

    Args:
        path: the checkpoint file, distributed-checkpoint directory, model folder or hub id.
        device: where the model runs; `auto` is CUDA when available, else the CPU.
        dtype: cast the model to this dtype (`bfloat16`, ...); None keeps the checkpoint's dtypes. Under
            quantization it is the compute dtype of the quantized layers.
        load_in_4bit: quantize the language model to NF4 with bitsandbytes (projector and tower unquantized).
        load_in_8bit: quantize the language model to int8 with bitsandbytes.
        model_id: the name reported in outputs; default `run_name/stage` from the run config, the folder name for
            an imported model.
        template: the chat template for a source that does not record one (official and llava-hf folders);
            default `vicuna_v1`. A template that disagrees with the one the source records is refused.
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if is_imported_source(path):
        model, tokenizer, run_config = _build_imported(str(path), template)
    else:
        model, tokenizer, run_config = _build_trained(Path(path), template)
    return _finish(
        model,
        tokenizer,
        run_config,
        device=device,
        torch_dtype=torch_dtype,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        model_id=model_id,
    )


def _build_trained(
    path: Path, template: str | None
) -> tuple[LlavaModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Model, tokenizer and run config from a training checkpoint (Lightning file or FSDP2 directory)."""
    if path.is_dir():
        if not (path / ".metadata").is_file() or not (path / DCP_META_FILE).is_file():
            raise ValueError(
                f"{path} is a directory but not a distributed training checkpoint (needs .metadata and "
                f"{DCP_META_FILE}); give a Lightning .ckpt file or an FSDP2 checkpoint directory"
            )
        checkpoint = torch.load(path / DCP_META_FILE, map_location="cpu", weights_only=True)
        run_config = _run_config(checkpoint, path)
        model, tokenizer = _build(run_config)
        _load_distributed_weights(model, path)
    elif path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        run_config = _run_config(checkpoint, path)
        if "state_dict" not in checkpoint:
            raise ValueError(f"{path} has no 'state_dict': not a Lightning checkpoint")
        if is_lora_run(run_config):  # adapters (+ projector) over a rebuilt base, merged: `lora_loading`
            model, tokenizer = build_lora_model(run_config, checkpoint.pop("state_dict"), source=str(path))
        else:
            model, tokenizer = _build(run_config)
            _load_weights(model, checkpoint.pop("state_dict"), path)
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    recorded = run_config["data"]["template"]
    if template is not None and template != recorded:
        raise ValueError(
            f"{path} was trained with template {recorded!r} (its run config's data.template), not {template!r}"
        )
    return model, tokenizer, run_config


def is_imported_source(path: str | Path) -> bool:
    """Whether `path` is read through `load_pretrained_llava` rather than as a training checkpoint: a folder with
    a `config.json` (transformers or official LLaVA), a projector weight file, or a hub id (`owner/name` that is
    not a local path)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return (local / "config.json").is_file() and not (local / ".metadata").is_file()
    if local.is_file():
        return local.suffix in (".bin", ".safetensors")
    text = str(path)
    return (
        text.count("/") == 1
        and not text.startswith((".", "/", "~"))
        and not text.endswith((".ckpt", ".ckpt.dir"))
    )


def _build_imported(
    source: str, template: str | None
) -> tuple[LlavaModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Model and tokenizer from `load_pretrained_llava`, and a run config holding what the source records."""
    from llava_lit.interop.pretrained import load_pretrained_llava

    pretrained = load_pretrained_llava(source)
    for note in pretrained.notes:
        log.info("%s: %s", source, note)
    if pretrained.template is not None:
        if template is not None and template != pretrained.template:
            raise ValueError(
                f"{source} records the chat template {pretrained.template!r} (its chat_template), "
                f"not {template!r}"
            )
        chosen = pretrained.template
    elif template is not None:
        chosen = template
        log.info("%s records no chat template: using %r as asked", source, chosen)
    else:
        chosen = DEFAULT_IMPORTED_TEMPLATE
        log.info(
            "%s (%s checkpoint) records no chat template: using %r, LLaVA-1.5's; pass template= if it was "
            "trained with another",
            source,
            pretrained.kind,
            chosen,
        )
    aspect = pretrained.image_aspect or "pad"
    model, tokenizer = pretrained.build()
    run_config = {
        "run_name": Path(source).name or source,
        "model": pretrained.config.to_node(),
        "data": {"template": chosen, "image_aspect": aspect, "system_prompt": pretrained.system_prompt},
        "imported": {"source": source, "kind": pretrained.kind},
    }
    log.info(
        "loaded %s (%s checkpoint): template %s, image aspect %s", source, pretrained.kind, chosen, aspect
    )
    return model, tokenizer, run_config


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


def _run_config(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The run config stored in a training checkpoint, checked to be plain data of the expected shape."""
    config = checkpoint.get("llava_lit_config")
    if not isinstance(config, Mapping) or "model" not in config or "data" not in config:
        raise ValueError(
            f"{path} has no 'llava_lit_config' with 'model' and 'data' nodes: it was not written by llava_lit's "
            "training, so the model, tokenizer and template cannot be rebuilt from it"
        )
    config = copy.deepcopy(dict(config))
    config["model"] = LlavaModelConfig.from_data(config["model"], source=str(path)).to_node()
    config["data"] = {**config["data"], **checked_data_settings(config["data"], source=str(path))}
    return config


def checked_data_settings(data: Any, *, source: str) -> dict[str, Any]:
    """The data settings inference needs (`template`, `system_prompt`, `image_aspect`, `max_length`), read from a
    file's run config and checked: plain values of the right type, a known template and aspect mode."""
    where = f"{source}: data"
    if not isinstance(data, Mapping):
        raise ConfigRefused(f"{where} must be a mapping of settings, got {type(data).__name__}")
    out = {key: check_plain_data(data.get(key), f"{where}.{key}") for key in INFERENCE_DATA_KEYS}
    if out["template"] not in TEMPLATES:
        raise ConfigRefused(
            f"{where}.template = {out['template']!r:.80}; known templates: {sorted(TEMPLATES)}"
        )
    if out["system_prompt"] is not None and not isinstance(out["system_prompt"], str):
        raise ConfigRefused(f"{where}.system_prompt must be a string or null")
    if out["image_aspect"] is None:
        out["image_aspect"] = "pad"
    if out["image_aspect"] not in ASPECT_MODES:
        raise ConfigRefused(
            f"{where}.image_aspect = {out['image_aspect']!r:.80}; allowed: {list(ASPECT_MODES)}"
        )
    if out["max_length"] is not None and (
        isinstance(out["max_length"], bool) or not isinstance(out["max_length"], int)
    ):
        raise ConfigRefused(f"{where}.max_length must be an integer or null")
    return out


INFERENCE_DATA_KEYS = ("template", "system_prompt", "image_aspect", "max_length")
"""The `data` settings of a run config that inference reads."""


def _build(run_config: Mapping[str, Any]) -> tuple[LlavaModel, PreTrainedTokenizerBase]:
    """The tokenizer and the model architecture from the (checked) run config; weights come from the checkpoint."""
    config = LlavaModelConfig.from_data(run_config["model"], source="run config")
    tokenizer = load_tokenizer(config.tokenizer_source, legacy=config.tokenizer_legacy)
    # The checkpoint holds every LLM weight: build the architecture only instead of loading the base weights.
    config = dataclasses.replace(
        config, language_model=dataclasses.replace(config.language_model, pretrained=False)
    )
    return config.build(tokenizer), tokenizer


def _load_weights(model: LlavaModel, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    state = {}
    for key, value in state_dict.items():
        if not key.startswith(MODULE_PREFIX):
            raise ValueError(f"{path}: unexpected state_dict key {key!r} (expected '{MODULE_PREFIX}...')")
        state[key[len(MODULE_PREFIX) :]] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model rebuilt from its config: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )


def _load_distributed_weights(model: LlavaModel, path: Path) -> None:
    """Read only `state_dict.model.*` from a distributed checkpoint, in place into `model`'s tensors."""
    import torch.distributed.checkpoint as dcp

    targets = {MODULE_PREFIX + k: v for k, v in model.state_dict().items()}
    # Without a process group DCP reads on this process alone; keys absent from the request (the optimizer) are
    # never read.
    dcp.load({"state_dict": targets}, checkpoint_id=str(path))
    # state_dict() tensors share storage with the parameters, except where a load replaced the object.
    own = model.state_dict()
    with torch.no_grad():
        for key, value in targets.items():
            own[key[len(MODULE_PREFIX) :]].copy_(value)


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
