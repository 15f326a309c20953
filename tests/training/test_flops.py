"""The step-FLOPs formula against `FlopCounterMode`, the batch-length rule of the batch contract, the peak table."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llava_lit.constants import IGNORE_INDEX
from llava_lit.flops import StepFlops, peak_flops_for_device, sequence_lengths
from llava_lit.model import LlavaModel
from llava_lit.model.projector import build_projector
from llava_lit.model.vision_tower import VisionTower
from llava_lit.module import next_token_loss
from llava_lit.stages import set_trainable, trainable_modules

IMAGE_TOKEN_ID = 255
LENGTHS = (200, 150, 90)  # real lengths of three samples, each starting with one image's 16 tokens


def _model() -> LlavaModel:
    """A tiny LLaVA whose attention, MLP and LM head are of similar cost (small vocabulary, long samples).

    Eager attention: FlopCounterMode has no formula for the CPU's fused SDPA kernel, and eager attention computes
    the same two matmuls the GPU SDPA formulas count.
    """
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    )
    vcfg._attn_implementation = "eager"
    tower = VisionTower(
        CLIPVisionModel(vcfg), backend="hf_clip", image_processor=CLIPImageProcessor(), feature_layer=-2
    )
    lcfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    lcfg._attn_implementation = "eager"
    return LlavaModel(tower, build_projector("mlp2x_gelu", 32, 64), LlamaForCausalLM(lcfg), IMAGE_TOKEN_ID)


def _sample(length: int) -> torch.Tensor:
    text = torch.randint(3, 250, (length - 16,))
    return torch.cat([torch.full((16,), IMAGE_TOKEN_ID), text])  # [length]


def _labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ids.masked_fill((ids == IMAGE_TOKEN_ID) | ~mask.bool(), IGNORE_INDEX)


def _counted(model: LlavaModel, batch: dict) -> int:
    """Matmul FLOPs of one forward + backward of `batch`, as FlopCounterMode counts them."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        logits = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            position_ids=batch.get("position_ids"),
        ).logits
        next_token_loss(logits, batch["labels"]).backward()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def samples() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [_sample(n) for n in LENGTHS]


@pytest.mark.parametrize(
    ("stage", "train_tower"), [("align", False), ("finetune", False), ("finetune", True)]
)
def test_formula_matches_flop_counter_padded_separate_and_packed(samples, stage, train_tower):
    model = _model().train()
    set_trainable(model, trainable_modules(stage, train_vision_tower=train_tower))
    formula = StepFlops.from_model(model)
    pixels = torch.randn(len(samples), 3, 56, 56)
    n = len(samples)

    # Padded: the kernels run over the padded length, so the counter sees n x max(s) tokens.
    width = max(LENGTHS)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample)] = sample
        mask[row, : len(sample)] = 1
    padded = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": _labels(ids, mask)}
    assert sequence_lengths(padded).tolist() == list(LENGTHS)
    assert formula.step(torch.full((n,), width), n) == pytest.approx(_counted(model, padded), rel=0.05)

    # Real lengths: the formula on the padded batch counts what the samples cost run one by one.
    separate = 0
    for k, sample in enumerate(samples):
        one = sample[None]
        ones = torch.ones_like(one)
        batch = {"input_ids": one, "attention_mask": ones, "pixel_values": pixels[k : k + 1]}
        separate += _counted(model, {**batch, "labels": _labels(one, ones)})
    assert formula.batch(padded) == pytest.approx(separate, rel=0.05)

    # Packed-like: one row, position ids restarting per sample, no mask to the model. Dense attention kernels
    # compute the whole row's square; the formula counts the samples' own squares, the useful part.
    row = torch.cat(samples)[None]  # [1, sum(s)]
    position_ids = torch.cat([torch.arange(len(s)) for s in samples])[None]
    ones = torch.ones_like(row)
    packed = {"input_ids": row, "attention_mask": None, "pixel_values": pixels, "position_ids": position_ids}
    counted_packed = _counted(model, {**packed, "labels": _labels(row, ones)})
    total = sum(LENGTHS)
    assert formula.step(torch.tensor([total]), n) == pytest.approx(counted_packed, rel=0.05)
    contract_batch = {**packed, "attention_mask": ones}
    assert sequence_lengths(contract_batch).tolist() == list(LENGTHS)
    assert formula.batch(contract_batch) == pytest.approx(separate, rel=0.05)


def test_stage_changes_the_count_as_documented():
    model = _model()
    set_trainable(model, trainable_modules("align"))
    align = StepFlops.from_model(model)
    set_trainable(model, trainable_modules("finetune"))
    finetune = StepFlops.from_model(model)
    assert align.llm_backward_per_token == pytest.approx(align.llm_per_token)  # input gradients only: 2N + 2N
    assert finetune.llm_backward_per_token == pytest.approx(2 * finetune.llm_per_token)  # 6N in all
    # A projector-only stage with a text-only batch runs no backward.
    lengths = torch.tensor([10, 20])
    assert align.step(lengths, 0) == pytest.approx(align.llm_per_token * 30 + align.attention_per_pair * 500)


def test_sequence_lengths_of_packed_rows_with_padding():
    batch = {
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0]]),
    }
    assert sequence_lengths(batch).tolist() == [2, 3, 3]
    bad = {**batch, "position_ids": torch.tensor([[1, 2, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0]])}
    with pytest.raises(ValueError, match="position id other than 0"):
        sequence_lengths(bad)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_table_matches_device_names(name, peak):
    assert peak_flops_for_device(name) == peak
