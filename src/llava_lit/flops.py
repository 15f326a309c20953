"""FLOPs of one LLaVA training step, and the peak FLOP/s of known GPUs, for `perf/tflops_per_s` and `perf/mfu`.

What is counted (matrix multiplications only, 2 FLOPs per multiply-add, as `torch.utils.flop_counter.FlopCounterMode`
counts them; norms, activations, softmax, rotary embeddings, the loss and the optimizer are not counted):

- Matmul weights: every `nn.Linear` weight (and the vision patch-embedding convolution) costs 2 FLOPs per weight per
  token in the forward pass. In the backward pass the input gradient costs another 2 per weight per token wherever
  the gradient has to flow further back, and the weight gradient 2 more only for weights that are trained. So a
  trained LLM matrix costs 6N per token, a frozen LLM matrix that the gradient crosses (stage 1, `align`: the
  LLM is frozen but the projector under it trains) 4N, and a frozen vision tower 2N (it runs without autograd).
  N counts the LLM's decoder-layer matrices and the LM head (the embedding lookup has no matmul); the sizes are
  read from the built modules (`nn.Linear` weights, so GQA, gated MLPs and untied heads count as built).
- Attention scores: per layer and sample of `s` real tokens, `Q @ K^T` and `P @ V` cost `2 * 2 * s^2 * H * d`
  forward (H query heads of width d; GQA repeats the KV heads) and twice that backward, over the real length of
  each sample: `sum(s_i^2)` for a padded batch and for a packed row alike (padding and cross-sample pairs of a
  packed row are not useful work). There is no causal halving: FlopCounterMode's SDPA formulas count the full
  `s x s` product, and so does this.
- Vision tower (HF CLIP runs all its layers even though the features come from the penultimate one; a timm tower
  stops at the selected block): per image, the patch convolution over P patches and the blocks over the P + prefix
  tokens. Counted forward only while frozen; when trained, 3x for the blocks and 2x for the patch convolution
  (the pixels need no gradient).
- Projector: per image token; weight gradients for trained layers, input gradients for every layer that has a
  trained parameter before it (the first layer's input gradient only when the tower trains).

The stage decides what trains (`stages.py`), and the flags are read from `requires_grad` when the `StepFlops` is
built, so the formula follows whatever the stage (or config) set. Input gradients are counted through the whole
LLM whenever anything trains (true for both stages: the projector sits under every LLM layer). A step without
images in a stage that trains only the projector has no backward pass.

The constants are computed once (`StepFlops.from_model`); a step then costs
`per_token * sum(s_i) + per_pair * sum(s_i^2) + per_image * n_images`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),  # SXM and PCIe, 40 and 80 GB
    ("L40S", 362e12),
    ("A10G", 70e12),  # AWS g5 (A10 at lower clocks)
    ("L4", 121e12),
)
"""Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, matched in order as case-insensitive substrings of
`torch.cuda.get_device_name()` (more specific names first). From NVIDIA's data sheets."""


def peak_flops_for_device(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU named `device_name`, or None when it is not in `PEAK_BF16_FLOPS`."""
    name = device_name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return flops
    return None


def _linear_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of every `nn.Linear` inside `module`, in registration order."""
    return [m.weight for m in module.modules() if isinstance(m, nn.Linear)]


def _weights_flops(weights: list[nn.Parameter], *, backward: bool) -> tuple[float, float]:
    """(forward, backward) FLOPs per token of `weights`, the input gradient always flowing on when `backward`."""
    forward = sum(2.0 * w.numel() for w in weights)
    if not backward:
        return forward, 0.0
    return forward, sum(2.0 * w.numel() * (2 if w.requires_grad else 1) for w in weights)


@dataclass(frozen=True)
class StepFlops:
    """The per-step FLOPs formula of one model in one stage (see the module docstring for what is counted)."""

    llm_per_token: float
    """LLM matmul FLOPs per real token, forward only (2N)."""
    llm_backward_per_token: float
    """LLM matmul FLOPs per real token in the backward pass (2N input gradients + 2N' for trained weights N')."""
    attention_per_pair: float
    """Attention-score FLOPs per (query, key) pair of one sample, forward only, summed over layers (4 * H * d * L)."""
    image_forward: float
    """Vision tower + projector FLOPs per image, forward."""
    image_backward: float
    """Vision tower + projector FLOPs per image, backward (0 when neither trains)."""
    llm_trains: bool
    """Whether any LLM parameter trains: the backward pass then runs even on batches without images."""

    @classmethod
    def from_model(cls, model: nn.Module) -> StepFlops:
        """Read shapes and the trained flags from a built `LlavaModel` (after the stage's freezing rule)."""
        lm = model.language_model
        config = lm.config
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        decoder = model.decoder_layers
        if len(decoder) != layers:
            raise ValueError(f"LLM config says {layers} layers, the built model has {len(decoder)}")
        llm_weights = [w for layer in decoder for w in _linear_weights(layer)]
        llm_weights.append(lm.get_output_embeddings().weight)
        llm_forward, llm_backward = _weights_flops(llm_weights, backward=True)
        llm_trains = any(p.requires_grad for p in lm.parameters())

        tower_forward, tower_backward, tower_trains = _tower_flops(model.vision_tower)
        tokens_per_image = model.num_image_tokens
        projector_forward = 0.0
        projector_backward = 0.0
        grad_below = tower_trains  # does anything under this projector layer need a gradient?
        for w in _linear_weights(model.projector):
            projector_forward += 2.0 * w.numel() * tokens_per_image
            projector_backward += (
                2.0 * w.numel() * tokens_per_image * (int(w.requires_grad) + int(grad_below))
            )
            grad_below = grad_below or w.requires_grad
        return cls(
            llm_per_token=llm_forward,
            llm_backward_per_token=llm_backward,
            attention_per_pair=4.0 * heads * head_dim * layers,
            image_forward=tower_forward + projector_forward,
            image_backward=tower_backward + projector_backward,
            llm_trains=llm_trains,
        )

    def step(self, seq_lens: torch.Tensor, n_images: int) -> float:
        """FLOPs of one forward + backward over samples of real lengths `seq_lens` ([n_samples]) with `n_images`."""
        tokens = float(seq_lens.sum())
        pairs = float((seq_lens.double() ** 2).sum())
        forward = (
            self.llm_per_token * tokens + self.attention_per_pair * pairs + self.image_forward * n_images
        )
        has_backward = self.llm_trains or (n_images > 0 and self.image_backward > 0)
        if not has_backward:
            return forward
        backward = (
            self.llm_backward_per_token * tokens
            + 2.0 * self.attention_per_pair * pairs
            + self.image_backward * n_images
        )
        return forward + backward

    def batch(self, batch: Mapping[str, Any]) -> float:
        """FLOPs of one training micro-batch (`sequence_lengths` and the images of the batch)."""
        pixel_values = batch.get("pixel_values")
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        return self.step(sequence_lengths(batch), n_images)


def _tower_flops(tower: nn.Module) -> tuple[float, float, bool]:
    """(forward, backward) FLOPs per image of the vision tower's executed part, and whether it trains."""
    backbone = tower.backbone
    if tower.backend == "hf_clip":
        cfg = backbone.config
        executed = list(tower.blocks)  # CLIP's encoder runs every layer; hidden_states are picked afterwards
        patches = (cfg.image_size // cfg.patch_size) ** 2
        seq = patches + 1  # CLS
        conv_per_patch = cfg.hidden_size * cfg.num_channels * cfg.patch_size**2
        width = cfg.hidden_size
        conv_weight = getattr(backbone, "vision_model", backbone).embeddings.patch_embedding.weight
    else:  # timm: forward_intermediates stops after the selected block
        executed = list(tower.blocks)[: tower._timm_block + 1]
        patches = int(backbone.patch_embed.num_patches)
        seq = patches + int(backbone.num_prefix_tokens)
        conv_weight = backbone.patch_embed.proj.weight
        conv_per_patch = conv_weight.numel()
        width = int(backbone.embed_dim)
    trains = any(p.requires_grad for p in tower.parameters())
    weights = [w for block in executed for w in _linear_weights(block)]
    block_forward = sum(2.0 * w.numel() for w in weights) * seq
    attention_forward = 4.0 * width * seq**2 * len(executed)
    conv_forward = 2.0 * conv_per_patch * patches
    forward = block_forward + attention_forward + conv_forward
    if not trains:
        return forward, 0.0, False
    block_backward = sum(2.0 * w.numel() * (1 + int(w.requires_grad)) for w in weights) * seq
    conv_backward = conv_forward if conv_weight.requires_grad else 0.0
    return forward, block_backward + 2.0 * attention_forward + conv_backward, True


def sequence_lengths(batch: Mapping[str, Any]) -> torch.Tensor:
    """Real lengths of the samples of a batch ([n_samples], int64) under the batch contract.

    With `position_ids`, every run that starts where `position_ids == 0` inside `attention_mask == 1` is one sample
    (packed rows hold several); without them, each row is one sample of `attention_mask.sum(-1)` tokens.
    """
    mask = batch["attention_mask"].bool()  # [B, L]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return mask.sum(-1)
    starts = (position_ids == 0) & mask  # [B, L]
    first = mask.long().argmax(-1, keepdim=True)  # [B, 1] each row's first real token
    if bool((mask.any(-1) & ~starts.gather(1, first).squeeze(1)).any()):
        raise ValueError(
            "a row's first real token has a position id other than 0: not a batch under the contract"
        )
    sample = starts.flatten().long().cumsum(0)  # [B*L] index of the sample each position belongs to, 1-based
    return torch.bincount(sample[mask.flatten()], minlength=int(sample[-1]) + 1)[1:]
