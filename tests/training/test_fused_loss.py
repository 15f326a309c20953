"""The fused LM-head + cross-entropy loss equals `next_token_loss` on the logits, in value and gradients."""

from __future__ import annotations

import pytest
import torch

from llava_lit.collate import collate_packed
from llava_lit.constants import IGNORE_INDEX
from llava_lit.loss import fused_next_token_loss, next_token_pairs
from llava_lit.module import next_token_loss


def _inputs(dtype=torch.float32, bias=False):
    torch.manual_seed(0)
    batch, length, width, vocab = 3, 11, 16, 50
    hidden = torch.randn(batch, length, width, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, width) / 4).to(dtype).requires_grad_()
    b = torch.randn(vocab, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels):
    return next_token_loss(torch.nn.functional.linear(hidden, weight, bias), labels)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_and_gradients_equal_the_logits_path(chunk_tokens, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    params = [hidden, weight] + ([b] if bias else [])
    expected = _reference(hidden, weight, b, labels)
    expected_grads = torch.autograd.grad(expected * 3.0, params)
    got = fused_next_token_loss(hidden, weight, labels, bias=b, chunk_tokens=chunk_tokens)
    got_grads = torch.autograd.grad(got * 3.0, params)  # a non-unit upstream gradient is scaled through
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_sum_reduction_and_frozen_head():
    hidden, weight, _, labels = _inputs()
    weight.requires_grad_(
        False
    )  # stage 1: the LM head is frozen, the gradient still reaches the hidden states
    shifted_logits, shifted_labels = next_token_pairs(hidden @ weight.T, labels)
    expected = torch.nn.functional.cross_entropy(
        shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    got = fused_next_token_loss(hidden, weight, labels, reduction="sum", chunk_tokens=5)
    torch.testing.assert_close(got, expected)
    (g_expected,) = torch.autograd.grad(expected, hidden)
    (g_got,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(g_got, g_expected)


def test_fused_loss_under_bf16_autocast_is_close():
    hidden, weight, _, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(hidden, weight, None, labels)
        got = fused_next_token_loss(hidden, weight, labels, chunk_tokens=8)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    g_expected = torch.autograd.grad(expected, [hidden, weight])
    g_got = torch.autograd.grad(got, [hidden, weight])
    for g, e in zip(g_got, g_expected, strict=True):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-3)


def _tiny_llava(tiny_backbones, tokenizer):
    from llava_lit.model import build_llava

    torch.manual_seed(0)
    return build_llava(
        vision_tower={"name_or_path": str(tiny_backbones / "clip")},
        projector="mlp2x_gelu",
        language_model={"name_or_path": str(tiny_backbones / "llm")},
        tokenizer=tokenizer,
    )


def test_sharded_head_is_refused(tmp_path, tiny_backbones, llama_tokenizer):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from llava_lit.module import LlavaLitModule

    hidden, weight, _, labels = _inputs()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        sharded = distribute_tensor(weight.detach(), mesh, [Shard(0)])  # as FSDP2 holds the LM head
        with pytest.raises(ValueError, match="sharded DTensor"):
            fused_next_token_loss(hidden, sharded, labels)
        # The module refuses the combination before sharding anything.
        module = LlavaLitModule(
            _tiny_llava(tiny_backbones, llama_tokenizer), torch.optim.AdamW, fused_loss=True
        )
        module._device_mesh = mesh  # what Lightning's ModelParallelStrategy sets
        with pytest.raises(ValueError, match="fused_loss=false with a sharded strategy"):
            module.configure_model()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_liger_fused_loss_matches_on_cuda():
    pytest.importorskip("liger_kernel")
    hidden, weight, _, labels = _inputs()
    hidden = hidden.detach().cuda().requires_grad_()
    weight = weight.detach().cuda().requires_grad_()
    labels = labels.cuda()
    expected = _reference(hidden, weight, None, labels)
    got = fused_next_token_loss(hidden, weight, labels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for g, e in zip(
        torch.autograd.grad(got, [hidden, weight]),
        torch.autograd.grad(expected, [hidden, weight]),
        strict=True,
    ):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_module_fused_loss_trains_as_the_logits_loss(tiny_backbones, llama_tokenizer, stage, packed):
    from llava_lit.module import LlavaLitModule
    from llava_lit.stages import set_trainable, trainable_modules

    model = _tiny_llava(tiny_backbones, llama_tokenizer).train()
    set_trainable(model, trainable_modules(stage))
    image = [model.image_token_id] * model.num_image_tokens
    ids = torch.tensor([[1, *image, 5, 6, 7, 8, 9], [1, *image, 10, 11, 12, 0, 0]])  # [2, 23]
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[23], [21]])).long()
    labels = ids.masked_fill((ids == model.image_token_id) | (mask == 0), IGNORE_INDEX)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.randn(2, 3, 56, 56),
    }
    if packed:  # the two samples in one row, positions restarting at the second (collate.collate_packed)
        batch = collate_packed(
            [
                [
                    {
                        "id": str(r),
                        "input_ids": ids[r, : int(mask[r].sum())],
                        "labels": labels[r, : int(mask[r].sum())],
                        "pixel_values": batch["pixel_values"][r : r + 1],
                    }
                    for r in range(2)
                ]
            ],
            pad_token_id=0,
        )
    trained = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fused in (False, True):
        module = LlavaLitModule(model, torch.optim.AdamW, fused_loss=fused)
        loss = module.loss(batch, reduction="sum")
        results.append((loss.detach(), torch.autograd.grad(loss, trained)))
    (loss_ref, grads_ref), (loss_fused, grads_fused) = results
    torch.testing.assert_close(loss_fused, loss_ref)
    for g, e in zip(grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
