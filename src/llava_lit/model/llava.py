"""`LlavaModel`: vision tower -> projector -> splice into the token embeddings -> language model.

The data pipeline has already expanded every `<image>` into `image_tokens(height, width)` copies of
`image_token_id` (a fixed `num_image_tokens` per image, or with AnyRes tiling a count set by the image's size);
the splice overwrites exactly those positions with projected image features, the k-th run (in row-major order of
`input_ids`) taking the k-th image. Nothing is re-padded or re-ordered, so attention masks,
labels and position ids computed by the data pipeline stay valid, and a batch without images never touches the
vision tower (the official code pushes a zero image through CLIP for text-only batches).

The model returns logits (or, for the fused loss, the last hidden states) only: the loss, with its single label
shift, belongs to the LightningModule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.image_tiling import AnyResSettings, TileLayout
from llava_lit.images import processor_output_size
from llava_lit.model.anyres import pack_image_features
from llava_lit.model.language_model import (
    LanguageModelConfig,
    build_language_model,
    resize_embeddings_for_tokenizer,
)
from llava_lit.model.projector import build_projector, check_projector_type
from llava_lit.model.vision_tower import VisionTower, VisionTowerConfig, build_vision_tower
from llava_lit.packing import check_packing_attention
from llava_lit.untrusted import ConfigRefused, dataclass_from_data

MODEL_PARTS = ("vision_tower", "projector", "language_model")
"""`LlavaModel`'s submodules, each the first component of its state-dict keys."""

BUILD_TARGET = "llava_lit.model.build_llava"
"""The one builder a model config node may name (`conf/model/*.yaml`, and the run config stored in checkpoints)."""

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""`attn_implementation` values accepted from a file (transformers would also load attention kernels named by a hub
repository, which is code)."""


class LlavaModel(nn.Module):
    """A LLaVA vision-language model over a HF causal LM.

    Submodules: `vision_tower` (`VisionTower`), `projector` (`nn.Linear` / `nn.Sequential` / `nn.Identity`),
    `language_model` (the HF `*ForCausalLM`). `decoder_layers` and `vision_tower.blocks` are the units to wrap for
    FSDP and activation checkpointing. With AnyRes tiling (`anyres`), each image arrives as its whole view plus
    tiles, and the projector holds the learned row-end vector `image_newline` (it trains with the projector).
    """

    def __init__(
        self,
        vision_tower: VisionTower,
        projector: nn.Module,
        language_model: PreTrainedModel,
        image_token_id: int,
        anyres: AnyResSettings | None = None,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)
        self.tile_layout = None if anyres is None else tile_layout_of(vision_tower, anyres)
        """The AnyRes tiling this model reads images with; None for one `num_image_tokens` view per image."""
        if anyres is not None and anyres.newline and getattr(projector, "image_newline", None) is None:
            raise ValueError(
                "an AnyRes model with anyres.newline needs projector.image_newline (add_image_newline)"
            )
        vocab = language_model.get_input_embeddings().weight.shape[0]
        if not 0 <= self.image_token_id < vocab:
            raise ValueError(
                f"image_token_id {self.image_token_id} is outside the language model's {vocab} embeddings; "
                "resize the embeddings for the tokenizer first"
            )

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image view (per image without AnyRes; the whole view's share with it)."""
        return self.vision_tower.num_image_tokens

    def image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens the data pipeline must emit for an image of `height` x `width` pixels."""
        if self.tile_layout is None:
            return self.num_image_tokens
        return self.tile_layout.num_tokens(height, width)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's transformer blocks (for FSDP wrapping / activation checkpointing)."""
        return self.language_model.get_decoder().layers

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> projected features in the projector's dtype."""
        # pixel_values: [N, 3, H, W]
        features = self.vision_tower(pixel_values)  # [N, T, C_vision], tower dtype (may be bf16)
        proj_param = next(self.projector.parameters(), None)
        if proj_param is not None:
            features = features.to(proj_param.dtype)
        return self.projector(features)  # [N, T, D]

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every image-placeholder run replaced by that image's projected features.

        `pixel_values` holds one view per image (`[N, 3, H, W]`), or with AnyRes every image's whole view and
        tiles, image after image (`[sum of tiles, 3, H, W]`), with `image_sizes` (`[N, 2]`, height and width of
        each original image). All views go through the tower in one batch. Raises `ValueError` when the number
        of placeholder positions does not equal the images' token counts, or when a run is cut (not that
        image's count of consecutive positions in one row).
        """
        # input_ids: [B, L]
        embeds = self.language_model.get_input_embeddings()(input_ids)  # [B, L, D]
        image_mask = input_ids == self.image_token_id  # [B, L]
        n_positions = int(image_mask.sum())
        if pixel_values is not None and pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [N, 3, H, W], got shape {tuple(pixel_values.shape)}")
        counts = self._image_token_counts(pixel_values, image_sizes)
        if n_positions != sum(counts):
            raise ValueError(
                f"the batch has {n_positions} image-token positions (id {self.image_token_id}) but "
                f"{len(counts)} images take {sum(counts)} tokens; the data pipeline must expand each <image> "
                "into image_tokens(height, width) placeholders and pass one image per run"
            )
        if not counts:
            return embeds
        self._check_image_runs(image_mask, counts)
        features = self.encode_images(pixel_values)  # [N, T, D] (AnyRes: N = all tiles)
        if self.tile_layout is None:
            features = features.flatten(0, 1)  # [N * T, D]
        else:
            newline = getattr(self.projector, "image_newline", None)
            sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
            features = pack_image_features(features, sizes, self.tile_layout, newline)  # [sum counts, D]
        # masked_scatter fills the True positions in row-major order: run k <- image k.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))  # [B, L, D]

    def _image_token_counts(
        self, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None
    ) -> list[int]:
        """Placeholder tokens of each image in the batch, checked against the views in `pixel_values`."""
        n_views = 0 if pixel_values is None else pixel_values.shape[0]
        if self.tile_layout is None:
            return [self.num_image_tokens] * n_views
        if n_views == 0:
            return []
        if image_sizes is None or image_sizes.ndim != 2 or image_sizes.shape[1] != 2:
            raise ValueError(
                "an AnyRes model needs image_sizes [N, 2] (height, width of each image) with its pixels"
            )
        sizes = image_sizes.tolist()
        tiles = sum(self.tile_layout.num_tiles(h, w) for h, w in sizes)
        if tiles != n_views:
            raise ValueError(
                f"image_sizes call for {tiles} tiles (whole views included) but pixel_values has {n_views}"
            )
        return [self.tile_layout.num_tokens(h, w) for h, w in sizes]

    @staticmethod
    def _check_image_runs(image_mask: torch.Tensor, counts: list[int]) -> None:
        """The placeholder positions, taken in order `counts[k]` at a time, must each be one unbroken run in
        one row."""
        seq_len = image_mask.shape[1]
        positions = image_mask.flatten().nonzero().squeeze(1)  # [sum counts] flat indices
        lengths = torch.tensor(counts, device=positions.device)
        ends = lengths.cumsum(0)  # [N]
        first, last = positions[ends - lengths], positions[ends - 1]
        unbroken = (last - first == lengths - 1) & (first // seq_len == last // seq_len)
        if not bool(unbroken.all()):
            bad = int((~unbroken).nonzero()[0, 0])
            raise ValueError(
                f"image-token run {bad} is not {counts[bad]} consecutive positions in one row (row "
                f"{int(first[bad]) // seq_len}); was a sequence truncated inside an image?"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        packed: bool = False,
        return_hidden: bool = False,
    ) -> CausalLMOutputWithPast | BaseModelOutputWithPast:
        """Logits for `input_ids` (no loss), or with `return_hidden` the last hidden states without the LM head.

        With a KV cache, `input_ids` holds only the new tokens while `attention_mask` covers the cached and the
        new ones (`[B, past + L]`). Default `position_ids` follow HF's left-padding convention:
        `attention_mask.cumsum(-1) - 1`, clamped at 0, so a left-padded row gets the same positions as unpadded.

        `packed`: each row holds several samples whose `position_ids` restart at 0 (`collate.collate_packed`).
        The LLM then gets those position ids and no attention mask, so transformers builds the block-diagonal
        causal mask from them (padding sits at row ends, where causal attention never reaches it from a real
        token). For flash-attention the rows are flattened into one, the layout its variable-length path reads
        from position ids. Needs no cache, and an implementation in `packing.PACKING_ATTENTION`.

        `image_sizes`: each image's (height, width), for an AnyRes model (see `embed_inputs`).

        `return_hidden` returns the decoder's output (`last_hidden_state: [B, L, D]`, after the final norm), for a
        loss that applies the LM head itself (`loss.fused_next_token_loss`).
        """
        # input_ids: [B, L]; attention_mask: [B, past + L]; pixel_values: [N, 3, H, W] | None; image_sizes: [N, 2]
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)  # [B, L, D]
        if packed:
            return self._forward_packed(
                inputs_embeds, position_ids, past_key_values, use_cache, return_hidden
            )
        if position_ids is None:
            seq_len = input_ids.shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]  # [B, L]
        llm = self.language_model.get_decoder() if return_hidden else self.language_model
        return llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,  # transformers 5 renamed the argument `past_key_values` -> `cache`
            use_cache=use_cache,
        )  # logits: [B, L, V] | last_hidden_state: [B, L, D]

    def _forward_packed(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
        past_key_values: Any,
        use_cache: bool,
        return_hidden: bool,
    ) -> CausalLMOutputWithPast | BaseModelOutputWithPast:
        """The LLM over packed rows: position ids and no mask (see `forward`)."""
        # inputs_embeds: [B, L, D]; position_ids: [B, L]
        if position_ids is None or past_key_values is not None or use_cache:
            raise ValueError("a packed batch needs its position_ids and no KV cache")
        attention = self.language_model.config._attn_implementation
        check_packing_attention(attention)
        batch, seq_len = position_ids.shape
        if attention.startswith("flash_attention"):
            inputs_embeds = inputs_embeds.reshape(1, batch * seq_len, -1)  # [1, B*L, D]
            position_ids = position_ids.reshape(1, batch * seq_len)  # [1, B*L]
        llm = self.language_model.get_decoder() if return_hidden else self.language_model
        out = llm(
            inputs_embeds=inputs_embeds, attention_mask=None, position_ids=position_ids, use_cache=False
        )
        if return_hidden:
            out.last_hidden_state = out.last_hidden_state.reshape(batch, seq_len, -1)  # [B, L, D]
        else:
            out.logits = out.logits.reshape(batch, seq_len, -1)  # [B, L, V]
        return out


def tile_layout_of(tower: VisionTower, anyres: AnyResSettings) -> TileLayout:
    """`anyres` bound to `tower`: its input side and feature grid. AnyRes lays out patch features only."""
    if tower.select_feature != "patch":
        raise ValueError(f"AnyRes needs vision_tower.select_feature=patch, not {tower.select_feature!r}")
    grid = math.isqrt(tower.num_image_tokens)
    if grid * grid != tower.num_image_tokens:
        raise ValueError(
            f"AnyRes needs a square feature grid; the tower gives {tower.num_image_tokens} tokens"
        )
    base = processor_output_size(tower.image_processor)
    if base[0] != base[1]:
        raise ValueError(f"AnyRes needs a square tower input, not {base[0]}x{base[1]}")
    return TileLayout(anyres, base=base[0], feature_grid=grid)


def add_image_newline(projector: nn.Module, dim: int) -> None:
    """Give `projector` the learned AnyRes row-end vector `image_newline` [dim], drawn as LLaVA-NeXT does
    (normal, std 1/sqrt(dim))."""
    projector.register_parameter("image_newline", nn.Parameter(torch.randn(dim) / math.sqrt(dim)))


def image_token_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of `<image>` in `tokenizer`, with a clear error when the tokenizer was loaded without it."""
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        raise ValueError(
            f"the tokenizer has no {IMAGE_TOKEN!r} token; load it with llava_lit.tokenization.load_tokenizer"
        )
    return int(vocab[IMAGE_TOKEN])


@dataclass
class LlavaModelConfig:
    """The whole model's settings, as `conf/model/*.yaml` spells them (minus the Hydra keys)."""

    vision_tower: VisionTowerConfig
    """How to build the vision tower."""
    projector: str
    """Projector type: `linear`, `mlp{N}x_gelu` or `identity`."""
    language_model: LanguageModelConfig
    """How to build the language model."""
    tokenizer_name_or_path: str | None = None
    """Where the tokenizer is loaded from; None = `language_model.name_or_path`."""
    tokenizer_legacy: bool | None = None
    """The SentencePiece tokenizer's `legacy` mode (it changes the ids of text after special tokens); None = the
    tokenizer folder's own setting, else legacy (see `tokenization.load_tokenizer`). Training records the mode
    it used here, so inference and exports never flip it."""
    anyres: AnyResSettings | None = None
    """AnyRes tiling (LLaVA-NeXT): grid pinpoints, unpad, newline; None reads each image as one tower view.
    Set together with `data.image_aspect=anyres`."""

    @property
    def tokenizer_source(self) -> str:
        """The folder or hub id the tokenizer is loaded from."""
        return self.tokenizer_name_or_path or self.language_model.name_or_path

    @classmethod
    def from_data(cls, node: Any, *, source: str) -> LlavaModelConfig:
        """Settings read from a file (a checkpoint's run config, an imported folder): checked, never instantiated.

        The node may carry the Hydra keys our own configs write (`_target_: llava_lit.model.build_llava`,
        `_convert_`), which are dropped; any other target, instantiation key, interpolation, unknown field or
        mistyped value raises `ConfigRefused` naming `source` and the field.
        """
        where = f"{source}: model"
        if not isinstance(node, Mapping):
            raise ConfigRefused(f"{where} must be a mapping of settings, got {type(node).__name__}")
        node = dict(node)
        target = node.pop("_target_", BUILD_TARGET)
        if target != BUILD_TARGET:
            raise ConfigRefused(
                f"{where}._target_ is {target!r:.80}: a model read from a file is built by {BUILD_TARGET} only; "
                "settings read from a file are data and are never instantiated"
            )
        if node.pop("_convert_", "all") not in ("all", "none", "partial", "object"):
            raise ConfigRefused(f"{where}._convert_ is not a Hydra conversion mode")
        config = dataclass_from_data(cls, node, where)
        try:
            check_projector_type(config.projector)
        except ValueError as err:
            raise ConfigRefused(f"{where}.projector: {err}") from None
        attention = config.language_model.attn_implementation
        if attention is not None and attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigRefused(
                f"{where}.language_model.attn_implementation = {attention!r:.80}; allowed from a file: "
                f"{list(ATTENTION_IMPLEMENTATIONS)}"
            )
        for part, dtype in (
            ("vision_tower", config.vision_tower.dtype),
            ("language_model", config.language_model.dtype),
        ):
            if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
                raise ConfigRefused(
                    f"{where}.{part}.dtype = {dtype!r:.80} is not float32, bfloat16 or float16"
                )
        return config

    def to_node(self) -> dict[str, Any]:
        """The config node as `conf/model/*.yaml` writes it (what a run config records)."""
        return {"_target_": BUILD_TARGET, "_convert_": "all", **dataclasses.asdict(self)}

    def build(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device | None = None,
        empty_weights: Collection[str] = (),
    ) -> LlavaModel:
        """Build the model these settings describe (see `build_llava`)."""
        return build_llava(
            vision_tower=self.vision_tower,
            projector=self.projector,
            language_model=self.language_model,
            tokenizer=tokenizer,
            device=device,
            empty_weights=empty_weights,
            anyres=self.anyres,
        )


def build_llava(
    *,
    vision_tower: VisionTowerConfig | dict[str, Any],
    projector: str,
    language_model: LanguageModelConfig | dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device | None = None,
    tokenizer_name_or_path: str | None = None,
    tokenizer_legacy: bool | None = None,
    empty_weights: Collection[str] = (),
    quantization: dict[str, Any] | None = None,
    quantized_device: str = "cpu",
    anyres: AnyResSettings | dict[str, Any] | None = None,
) -> LlavaModel:
    """Build a `LlavaModel` (the Hydra target of `conf/model/*.yaml`).

    `device="meta"` builds the real-size architecture without memory or weights (configs come from
    `config_path` / the checkpoints' `config.json`), for parameter counting and deferred FSDP init. Any other
    device loads on the CPU and then moves there. `empty_weights` names parts (`vision_tower`, `projector`,
    `language_model`) whose parameters stay on the meta device, neither loaded nor initialised, while their
    buffers are real: a checkpoint loader then assigns its tensors as the parameters
    (`load_state_dict(..., assign=True)`), so the weights are held once. `tokenizer_name_or_path` and
    `tokenizer_legacy` are read by the caller that loads the tokenizer; they are accepted here only so the model
    config node can be instantiated as is.
    `quantization` and `quantized_device` load the language model quantized (QLoRA,
    `lora.quantization_arguments`); `device` then places the rest.
    `anyres` makes it an AnyRes model (`LlavaModelConfig.anyres`); with its newline the projector gets
    `image_newline`.
    """
    del tokenizer_name_or_path, tokenizer_legacy  # consumed by the tokenizer loader, see docstring
    if isinstance(vision_tower, dict):
        vision_tower = VisionTowerConfig(**vision_tower)
    if isinstance(language_model, dict):
        language_model = LanguageModelConfig(**language_model)
    if isinstance(anyres, dict):
        anyres = AnyResSettings(**anyres)
    unknown = set(empty_weights) - set(MODEL_PARTS)
    if unknown:
        raise ValueError(f"empty_weights names unknown parts {sorted(unknown)}; parts: {list(MODEL_PARTS)}")
    image_token_id = image_token_id_of(tokenizer)
    on_meta = device is not None and torch.device(device).type == "meta"
    with torch.device("meta") if on_meta else nullcontext():
        tower = build_vision_tower(
            vision_tower, on_meta=on_meta, empty_weights="vision_tower" in empty_weights
        )
        empty_lm = "language_model" in empty_weights
        lm = build_language_model(
            language_model,
            on_meta=on_meta,
            empty_weights=empty_lm,
            quantization=quantization,
            quantized_device=quantized_device,
        )
        with init_empty_weights(include_buffers=False) if empty_lm else nullcontext():
            resize_embeddings_for_tokenizer(lm, len(tokenizer), language_model.pad_vocab_to_multiple_of)
        with init_empty_weights(include_buffers=False) if "projector" in empty_weights else nullcontext():
            proj = build_projector(projector, tower.hidden_size, lm.get_input_embeddings().embedding_dim)
            if anyres is not None and anyres.newline:
                add_image_newline(proj, lm.get_input_embeddings().embedding_dim)
    model = LlavaModel(tower, proj, lm, image_token_id, anyres)
    if device is not None and not on_meta:
        model.to(device)
    return model
