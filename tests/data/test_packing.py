"""Packing on the data side: first-fit-decreasing rows, the packed batch layout, and the datamodule's guarantees
(equal batches per rank, every sample once, exact resume) with packing on; the step-token stamps."""

from __future__ import annotations

import pytest
import torch

from llava_lit.collate import collate_packed, supervised_tokens
from llava_lit.constants import IGNORE_INDEX, STEP_TOKENS_KEY
from llava_lit.convert import convert
from llava_lit.datamodule import stamp_step_tokens
from llava_lit.packing import (
    check_packing_attention,
    pack_first_fit_decreasing,
    pack_into_batches,
    padded_size,
)

from .test_datamodule import N_IMG
from .test_datamodule import make_dm as datamodule_for


@pytest.fixture(scope="module")
def shards(llava_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("packing_shards")
    convert(llava_dataset["json"], llava_dataset["images"], out, samples_per_shard=5, progress=False)
    return out  # 38 samples in 8 shards


def make_dm(shards, tokenizer, processor, **kwargs):
    dm = datamodule_for(shards, tokenizer, processor, **kwargs)
    dm.setup("fit")
    return dm


def sample_lengths(batch):
    """Per-sample lengths of a batch, as the batch contract defines them."""
    mask = batch["attention_mask"].bool()
    if "position_ids" not in batch:
        return mask.sum(1).tolist()
    out = []
    for row_mask, pos in zip(mask, batch["position_ids"], strict=True):
        starts = ((pos == 0) & row_mask).nonzero().flatten().tolist() + [int(row_mask.sum())]
        out += [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return out


def test_first_fit_decreasing_fills_rows_and_keeps_every_item():
    lengths = [700, 600, 500, 400, 300, 200, 100, 50]
    rows = pack_first_fit_decreasing(lengths, 1000)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 1000 for row in rows)
    assert len(rows) == 3  # 2850 tokens: 700+300, 600+400, 500+200+100+50
    assert [sum(lengths[i] for i in row) for row in rows] == [1000, 1000, 850]
    # Fewer rows than batches: rows are split until every batch gets one.
    assert len(pack_first_fit_decreasing([10, 10, 10], 100, min_rows=3)) == 3
    with pytest.raises(ValueError, match="does not fit"):
        pack_first_fit_decreasing([101], 100)
    plan = pack_into_batches(lengths, 1000, 2)
    assert len(plan) == 2 and sorted(i for b in plan for r in b for i in r) == list(range(len(lengths)))
    assert padded_size(lengths, plan) <= 3 * 1000


def test_collate_packed_layout():
    def sample(name, ids, labels, images=0):
        pixels = torch.full((images, 3, 2, 2), float(len(name))) if images else None
        return {
            "id": name,
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixels,
        }

    a = sample("a", [1, 5, 6], [7, 5, 6], images=1)  # a first label that is not ignored must become so
    b = sample("bb", [1, 8], [-100, 8])
    c = sample("ccc", [1, 9, 9, 9], [-100, -100, 9, 9], images=2)
    batch = collate_packed([[a, b], [c]], pad_token_id=0)
    assert batch["ids"] == ["a", "bb", "ccc"]
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 8], [1, 9, 9, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 8], [-100, -100, 9, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 3.0]  # images in row-major run order
    assert sample_lengths(batch) == [3, 2, 4]
    # No label at a boundary: after the single shift, no target is a sample's first token.
    shifted = batch["labels"][:, 1:]
    starts = batch["position_ids"][:, 1:] == 0
    assert (shifted[starts] == IGNORE_INDEX).all()
    assert int(supervised_tokens(batch["labels"])) == 5


def test_packing_keeps_batch_counts_samples_and_resume(shards, llama_tokenizer, clip_processor_56):
    per_rank = []
    for rank in (0, 1):
        plain = make_dm(shards, llama_tokenizer, clip_processor_56, world_size=2, rank=rank)
        packed = make_dm(
            shards,
            llama_tokenizer,
            clip_processor_56,
            world_size=2,
            rank=rank,
            packing=True,
            length_group_steps=2,
        )
        plain_batches, batches = list(plain.train_dataloader()), list(packed.train_dataloader())
        assert len(batches) == len(plain_batches) == packed.train_batches_per_epoch
        assert sorted(i for b in batches for i in b["ids"]) == sorted(
            i for b in plain_batches for i in b["ids"]
        )
        assert all(b["input_ids"].shape[0] <= 4 and b["input_ids"].shape[1] <= 256 for b in batches)
        assert any(len(b["ids"]) > b["input_ids"].shape[0] for b in batches)  # rows do hold several samples
        assert sum(b["attention_mask"].numel() for b in batches) < sum(
            b["attention_mask"].numel() for b in plain_batches
        )
        # Each sample keeps its length, its labels stop at boundaries, its image runs are whole.
        lengths = {i: n for b in plain_batches for i, n in zip(b["ids"], sample_lengths(b), strict=True)}
        for b in batches:
            assert [lengths[i] for i in b["ids"]] == sample_lengths(b)
            assert (b["labels"][:, 1:][b["position_ids"][:, 1:] == 0] == IGNORE_INDEX).all()
            n_images = 0 if b["pixel_values"] is None else b["pixel_values"].shape[0]
            assert (
                int((b["input_ids"] == plain.tokenizer.convert_tokens_to_ids("<image>")).sum())
                == n_images * N_IMG
            )
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])
    ids = [i for batches in per_rank for b in batches for i in b["ids"]]
    assert len(ids) == 38 == len(set(ids))


def test_packed_resume_rebuilds_the_interrupted_group(shards, llama_tokenizer, clip_processor_56):
    def packed_dm():
        return make_dm(
            shards, llama_tokenizer, clip_processor_56, num_workers=0, packing=True, length_group_steps=3
        )

    batches = list(packed_dm().train_dataloader())
    assert len(batches) == 10
    loader = packed_dm().train_dataloader()
    loader.resume_fn = lambda: 4  # inside the second group of 3 micro-batches
    resumed = list(loader)
    assert [b["ids"] for b in resumed] == [b["ids"] for b in batches[4:]]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, batches[4:], strict=True))


def test_validation_stays_unpacked(shards, llama_tokenizer, clip_processor_56):
    dm = make_dm(shards, llama_tokenizer, clip_processor_56, packing=True, val_shards_per_source=1)
    assert all("position_ids" not in b and STEP_TOKENS_KEY not in b for b in dm.val_dataloader())


def test_every_batch_carries_its_steps_supervised_tokens(shards, llama_tokenizer, clip_processor_56):
    dm = make_dm(
        shards, llama_tokenizer, clip_processor_56, num_workers=2, accumulate_grad_batches=3, packing=True
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 10  # 3 steps of 3 micro-batches, then a last step of one
    for start in range(0, 10, 3):
        step = batches[start : start + 3]
        total = sum(int(supervised_tokens(b["labels"])) for b in step)
        assert [int(b[STEP_TOKENS_KEY]) for b in step] == [total] * len(step)
    # A resume inside a step stamps the rest of that step with the rest's count: the batches before the
    # checkpoint were already trained with theirs.
    dm = make_dm(
        shards, llama_tokenizer, clip_processor_56, num_workers=0, accumulate_grad_batches=3, packing=True
    )
    batches = list(dm.train_dataloader())
    resumed = make_dm(
        shards, llama_tokenizer, clip_processor_56, num_workers=0, accumulate_grad_batches=3, packing=True
    ).train_dataloader()  # a fresh module: another train_dataloader() of the same one would be epoch 1
    resumed.resume_fn = lambda: 4
    stamps = [int(b[STEP_TOKENS_KEY]) for b in resumed]
    assert stamps[:2] == [sum(int(supervised_tokens(b["labels"])) for b in batches[4:6])] * 2
    assert stamps[2:] == [int(b[STEP_TOKENS_KEY]) for b in batches[6:]]
    assert [int(b[STEP_TOKENS_KEY]) for b in stamp_step_tokens(batches[:5], 2, first_batch=1)][0] == int(
        supervised_tokens(batches[0]["labels"])
    )


def test_packing_refuses_attention_that_mixes_samples():
    for name in ("sdpa", "eager", "flash_attention_2"):
        check_packing_attention(name)
    with pytest.raises(ValueError, match="data.packing=true needs"):
        check_packing_attention("flex_attention")
