"""The next-token shift, and a fused LM-head + cross-entropy loss that never holds the `[tokens x vocab]` logits.

`next_token_pairs` is the one place the labels are shifted: position `i`'s logits (or last hidden state) are
paired with label `i + 1`. `module.next_token_loss` (from logits) and `fused_next_token_loss` (from hidden states
and the LM-head weight) both pair through it, so they score the same targets.

The fused loss runs liger-kernel's `LigerFusedLinearCrossEntropyLoss` (Triton) on CUDA when the package is
installed (`pip install llava-lit[gpu]`), and otherwise `ChunkedLinearCrossEntropy`: plain PyTorch, a chunk of
tokens at a time, the gradients computed in the forward pass so no chunk's logits outlive it (the scheme liger
uses). Peak extra memory is one chunk's `[chunk x vocab]` fp32 logits instead of the whole batch's.

The LM-head weight must be a plain tensor: under FSDP2 it is a sharded DTensor outside the model's forward, and the
fused loss refuses it (`ValueError`).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F

from llava_lit.constants import IGNORE_INDEX

Reduction = Literal["mean", "sum"]

DEFAULT_CHUNK_TOKENS = 2048
"""Tokens per chunk of `ChunkedLinearCrossEntropy`: 2048 x 32k vocab fp32 logits and their gradient ~0.5 GiB."""


def next_token_pairs(states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each position's `states` with the next position's label, flattened over batch and positions.

    states: [B, L, *] (logits or hidden states); labels: [B, L] unshifted, `IGNORE_INDEX` where no loss is wanted.
    Returns `states[:, :-1]` as [B*(L-1), *] and `labels[:, 1:]` as [B*(L-1)].
    """
    return states[:, :-1].flatten(0, 1), labels[:, 1:].flatten()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, a chunk of tokens at a time.

    The forward pass computes, per chunk, the fp32 logits, their log-sum-exp and the loss, and right away the
    gradients of the (summed or mean) loss with respect to the chunk's hidden states and to the weight and bias
    (accumulated in fp32); the backward pass only scales them by the incoming gradient. Matmuls follow the
    autocast state of the caller, as `F.linear` would in the unfused path.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        reduction: Reduction,
        chunk_tokens: int,
    ) -> torch.Tensor:
        # hidden: [N, D]; weight: [V, D]; bias: [V] | None; targets: [N]
        valid = targets != IGNORE_INDEX  # [N]
        device = hidden.device
        scale = 1.0 / valid.sum().clamp(min=1) if reduction == "mean" else torch.ones((), device=device)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        fp32 = {"dtype": torch.float32, "device": device}
        grad_weight = torch.zeros(weight.shape, **fp32) if need_weight else None  # [V, D]
        grad_bias = torch.zeros(weight.shape[0], **fp32) if need_bias else None  # [V]
        total = torch.zeros((), **fp32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]  # [C, D]
            t = targets[start : start + chunk_tokens]  # [C]
            ok = valid[start : start + chunk_tokens]  # [C]
            logits = F.linear(h, weight, bias).float()  # [C, V]
            safe_t = t.masked_fill(~ok, 0)  # [C] any class for ignored rows; their terms are zeroed
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)  # [C]
            total += ((lse - picked) * ok).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss / d logits = (softmax - onehot) * scale on counted rows, 0 on ignored ones.
            grad_logits = logits.sub_(lse[:, None]).exp_()  # [C, V] softmax, in the logits' memory
            grad_logits[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            grad_logits *= (ok.float() * scale)[:, None]
            if need_hidden:
                chunk_grad = grad_logits.to(weight.dtype) @ weight  # [C, D]
                grad_hidden[start : start + chunk_tokens] = chunk_grad.to(hidden.dtype)
            if need_weight:
                grad_weight += (grad_logits.t().to(h.dtype) @ h).float()  # [V, D]
            if need_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


@functools.cache
def _liger_loss(reduction: Reduction) -> torch.nn.Module | None:
    """liger-kernel's fused loss module, or None when the package is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction=reduction)


def fused_next_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    use_liger: bool = True,
) -> torch.Tensor:
    """`next_token_loss(hidden @ weight.T + bias, labels)` without the full logits.

    hidden: [B, L, D] last hidden states (after the final norm); weight: [V, D] the LM head; labels: [B, L]
    unshifted. `reduction="mean"` averages over the targets that are not `IGNORE_INDEX` (0, not NaN, when there
    are none), "sum" adds them up.
    Runs liger-kernel on CUDA when it is installed and `use_liger`, else `ChunkedLinearCrossEntropy`.
    """
    if hasattr(weight, "full_tensor"):  # torch.distributed.tensor.DTensor
        raise ValueError(
            "the fused loss needs the LM-head weight as a plain tensor, but it is a sharded DTensor (FSDP2); "
            "set module.fused_loss=false under a sharded strategy"
        )
    flat_hidden, targets = next_token_pairs(hidden, labels)  # [N, D], [N]
    if use_liger and flat_hidden.is_cuda:
        liger = _liger_loss(reduction)
        if liger is not None:
            return liger(weight, flat_hidden.contiguous(), targets, bias)
    return ChunkedLinearCrossEntropy.apply(flat_hidden, weight, bias, targets, reduction, chunk_tokens)
