"""The datamodule on converted shards: 2 workers, a simulated 2-rank split, equal batches, no repeats."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llava_lit.collate import collate
from llava_lit.constants import IGNORE_INDEX
from llava_lit.convert import convert
from llava_lit.datamodule import LlavaDataModule, Segment, plan_epoch, slice_segments, split_range
from llava_lit.shards import read_manifest
from llava_lit.tokenization import image_token_id

N_IMG = 16  # the tiny 56-px / patch-14 tower


@pytest.fixture(scope="module")
def shards(llava_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    convert(llava_dataset["json"], llava_dataset["images"], out, samples_per_shard=5, progress=False)
    return out  # 38 samples in 8 shards (5 x 7 + 3)


def make_dm(shards, tokenizer, processor, **kwargs):
    settings = dict(
        sources=[{"path": str(shards), "weight": 1.0}],
        template="vicuna_v1",
        max_length=256,
        micro_batch_size=4,
        num_workers=2,
        shuffle_buffer=8,
        seed=3,
        pin_memory=False,
    )
    settings.update(kwargs)
    return LlavaDataModule(tokenizer=tokenizer, image_processor=processor, num_image_tokens=N_IMG, **settings)


def run_epoch(dm):
    return list(dm.train_dataloader())


def test_two_ranks_two_workers_equal_batches_no_repeats(shards, llama_tokenizer, clip_processor_56):
    per_rank = []
    for rank in (0, 1):
        dm = make_dm(shards, llama_tokenizer, clip_processor_56, world_size=2, rank=rank)
        dm.setup("fit")
        assert dm.num_train_samples == 38
        batches = run_epoch(dm)
        assert len(batches) == dm.train_batches_per_epoch == len(dm.train_dataloader())
        per_rank.append(batches)
        assert dm.skip_counts["repeated_to_fill"] == 0
    assert len(per_rank[0]) == len(per_rank[1])
    ids = [i for batches in per_rank for b in batches for i in b["ids"]]
    assert len(ids) == 38 == len(set(ids))  # 19 per rank, every sample exactly once


def test_batches_follow_the_contract(shards, llama_tokenizer, clip_processor_56):
    dm = make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=0)
    dm.setup("fit")
    img = image_token_id(llama_tokenizer)
    text_only_seen = False
    for batch in run_epoch(dm):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == torch.long
        assert ids.shape == mask.shape == labels.shape
        assert (ids[mask == 0] == llama_tokenizer.pad_token_id).all()
        assert (labels[mask == 0] == IGNORE_INDEX).all()
        trained = labels != IGNORE_INDEX
        assert torch.equal(labels[trained], ids[trained])
        n_images = int((ids == img).sum()) // N_IMG
        if n_images:
            assert batch["pixel_values"].shape == (n_images, 3, 56, 56)
        else:
            assert batch["pixel_values"] is None
        text_only_seen |= any(((ids[r] == img).sum() == 0) for r in range(len(ids)))
    assert text_only_seen


def test_system_prompt_setting_reaches_the_samples(shards, llama_tokenizer, clip_processor_56):
    """`data.system_prompt` replaces the template's in every sample; None keeps it."""
    texts = {}
    for system in (None, "", "Answer briefly."):
        dm = make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=0, system_prompt=system)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        texts[system] = [llama_tokenizer.decode(row, skip_special_tokens=True) for row in batch["input_ids"]]
    assert all(t.startswith("A chat between a curious user") for t in texts[None])
    assert all(t.lstrip().startswith("USER:") for t in texts[""])
    assert all(t.startswith("Answer briefly. USER:") for t in texts["Answer briefly."])


def test_epochs_reshuffle_and_are_reproducible(shards, llama_tokenizer, clip_processor_56):
    dm = make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = [i for b in loader for i in b["ids"]]
    epoch1 = [i for b in loader for i in b["ids"]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    again = make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=0)
    again.setup("fit")
    assert [i for b in again.train_dataloader() for i in b["ids"]] == epoch0


def test_sample_cache_gives_the_same_batches_and_encodes_each_sample_once(
    shards, llama_tokenizer, clip_processor_56
):
    plain = make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=0)
    cached = make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=0, cache_samples=True)
    plain_loader, cached_loader = plain.train_dataloader(), cached.train_dataloader()
    encoder = cached_loader.dataset.encoder
    calls = 0
    inner = encoder.encoder

    def counting(raw):
        nonlocal calls
        calls += 1
        return inner(raw)

    encoder.encoder = counting
    for epoch in range(2):
        expected, got = list(plain_loader), list(cached_loader)
        assert [b["ids"] for b in got] == [b["ids"] for b in expected]  # the same order, epoch by epoch
        for a, b in zip(expected, got, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            pa, pb = a["pixel_values"], b["pixel_values"]
            assert (pa is None and pb is None) or torch.equal(pa, pb)
        assert calls == 38, epoch  # every sample encoded in the first epoch, none in the second
    with pytest.raises(ValueError, match="num_workers=0"):
        make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=2, cache_samples=True)


def test_group_by_length_sorts_each_step_and_keeps_its_samples(shards, llama_tokenizer, clip_processor_56):
    # Micro-batches of 4, 3 per optimizer step: each step's 12 samples are the ones it gets without
    # grouping, cut into micro-batches by length.
    plain = make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=0, accumulate_grad_batches=3)

    def grouped_dm():
        return make_dm(
            shards,
            llama_tokenizer,
            clip_processor_56,
            num_workers=0,
            accumulate_grad_batches=3,
            group_by_length=True,
        )

    grouped = grouped_dm()
    plain.setup("fit")
    grouped.setup("fit")
    ungrouped_batches, batches = run_epoch(plain), run_epoch(grouped)
    assert len(batches) == len(ungrouped_batches) == grouped.train_batches_per_epoch == 10
    for step in range(0, 10, 3):
        ids = [i for b in batches[step : step + 3] for i in b["ids"]]
        assert sorted(ids) == sorted(i for b in ungrouped_batches[step : step + 3] for i in b["ids"])
        lengths = [b["attention_mask"].sum(1).tolist() for b in batches[step : step + 3]]
        assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:], strict=False))
    padded = sum(b["attention_mask"].numel() for b in batches)
    assert padded < sum(b["attention_mask"].numel() for b in ungrouped_batches)
    # Resuming after batch 4 (inside the second step) rebuilds that step and yields its remaining batches.
    resumed = grouped_dm()
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    loader.resume_fn = lambda: 4
    assert [b["ids"] for b in loader] == [b["ids"] for b in batches[4:]]


def test_length_groups_of_several_steps_without_accumulation(shards, llama_tokenizer, clip_processor_56):
    # Micro-batches of 4, no accumulation, 3 steps sorted together: each group's 12 samples are those of the
    # ungrouped run's 3 batches, cut by length, and its batches come in a seeded order.
    def dm(**kw):
        out = make_dm(shards, llama_tokenizer, clip_processor_56, num_workers=0, **kw)
        out.setup("fit")
        return out

    plain, grouped = run_epoch(dm()), run_epoch(dm(group_by_length=True, length_group_steps=3))
    assert len(grouped) == len(plain) == 10
    for start in range(0, 10, 3):
        group = grouped[start : start + 3]
        assert sorted(i for b in group for i in b["ids"]) == sorted(
            i for b in plain[start : start + 3] for i in b["ids"]
        )
        spans = sorted((min(n), max(n)) for n in (b["attention_mask"].sum(1).tolist() for b in group))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # disjoint length ranges
    assert sum(b["attention_mask"].numel() for b in grouped) < sum(b["attention_mask"].numel() for b in plain)
    # Not shortest first in every group (that would make each group's steps run from short to long samples).
    starts = [[int(b["attention_mask"].sum(1).min()) for b in grouped[s : s + 3]] for s in range(0, 9, 3)]
    assert any(group != sorted(group) for group in starts), starts
    assert [b["ids"] for b in run_epoch(dm(group_by_length=True, length_group_steps=3))] == [
        b["ids"] for b in grouped
    ]
    resumed = dm(group_by_length=True, length_group_steps=3)
    loader = resumed.train_dataloader()
    loader.resume_fn = lambda: 4  # inside the second group
    assert [b["ids"] for b in loader] == [b["ids"] for b in grouped[4:]]
    with pytest.raises(ValueError, match="length_group_steps"):
        dm(length_group_steps=0)


def test_fewer_shards_than_workers(llava_dataset, llama_tokenizer, clip_processor_56, tmp_path):
    convert(llava_dataset["json"], llava_dataset["images"], tmp_path, samples_per_shard=100, progress=False)
    counts = []
    for rank in (0, 1):
        dm = make_dm(tmp_path, llama_tokenizer, clip_processor_56, world_size=2, rank=rank, num_workers=2)
        dm.setup("fit")
        counts.append(sum(len(b["ids"]) for b in run_epoch(dm)))
    assert counts == [19, 19]


def test_validation_holdout_and_mixing(shards, llama_tokenizer, clip_processor_56):
    dm = make_dm(
        shards,
        llama_tokenizer,
        clip_processor_56,
        num_workers=0,
        val_shards_per_source=1,
        sources=[{"path": str(shards), "weight": 1.0}, {"path": str(shards), "weight": 0.5, "name": "half"}],
    )
    dm.setup("fit")
    train_n = 38 - 3  # the last shard (3 samples) is held out of both sources
    assert dm.num_train_samples == train_n + round(0.5 * train_n)
    train_ids = [i for b in run_epoch(dm) for i in b["ids"]]
    assert len(train_ids) == dm.num_train_samples
    val_ids = [i for b in dm.val_dataloader() for i in b["ids"]]
    assert len(val_ids) == 6 and not set(val_ids) & set(train_ids)


def test_unmaskable_samples_are_counted_and_replaced(shards, llama_tokenizer, clip_processor_56, tmp_path):
    # Rewrite two records so their answers contain an image marker: they cannot be learned.
    from llava_lit.shards import ShardWriter, iter_raw_samples, parse_sample, read_manifest, write_manifest

    manifest = read_manifest(shards)
    writer = ShardWriter(tmp_path, samples_per_shard=5)
    broken = 0
    for shard in manifest.shards:
        for raw in iter_raw_samples(shards / shard.name):
            record, images = parse_sample(raw)
            if broken < 2 and images:
                record["conversations"][1]["value"] += " <image>"
                broken += 1
            writer.write(raw["__key__"], record, dict(zip(record["image_keys"], images, strict=True)))
    writer.close()
    write_manifest(tmp_path, dataclasses.replace(manifest, shards=writer.shards))

    dm = make_dm(tmp_path, llama_tokenizer, clip_processor_56, num_workers=2)
    dm.setup("fit")
    batches = run_epoch(dm)
    assert len(batches) == dm.train_batches_per_epoch
    assert sum(len(b["ids"]) for b in batches) == 38  # the two skipped samples are replaced by repeats
    assert dm.skip_counts["image_in_answer"] == 2
    assert dm.skip_counts["repeated_to_fill"] == 2
    for b in batches:  # no sample trains at zero loss
        assert ((b["labels"] != IGNORE_INDEX).sum(dim=1) > 0).all()


def test_plan_and_split_helpers():
    assert [split_range(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert split_range(1, 2, 1) == (1, 1)
    segs = [Segment("a", 0, 5), Segment("b", 0, 3)]
    assert slice_segments(segs, 3, 7) == [Segment("a", 3, 5), Segment("b", 0, 2)]
    from llava_lit.datamodule import Source

    src = Source("s", 2.0, (("a", 5), ("b", 3)))
    plan = plan_epoch([src], seed=0, epoch=0, shuffle=True)
    assert sum(len(s) for s in plan) == 16


def test_collate_pads_right(llama_tokenizer):
    samples = [
        {
            "id": "a",
            "input_ids": torch.tensor([1, 5, 6]),
            "labels": torch.tensor([-100, 5, 6]),
            "pixel_values": None,
        },
        {
            "id": "b",
            "input_ids": torch.tensor([1, 7]),
            "labels": torch.tensor([-100, 7]),
            "pixel_values": torch.zeros(2, 3, 4, 4),
        },
    ]
    batch = collate(samples, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["ids"] == ["a", "b"]
    assert json.dumps(batch["ids"])


@pytest.mark.parametrize("name", ["lcs558k", "mix665k"])
def test_data_configs_instantiate(name, shards, llama_tokenizer, clip_processor_56):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # The data files read micro_batch_size and seed from the root config; stand in for it here.
    root = OmegaConf.create({"micro_batch_size": 4, "seed": 0})
    root.data = OmegaConf.load(Path(__file__).parents[2] / "conf" / "data" / f"{name}.yaml")
    cfg = root.data
    cfg.sources[0].path = str(shards)
    cfg.num_workers = 0
    dm = instantiate(
        cfg, tokenizer=llama_tokenizer, image_processor=clip_processor_56, num_image_tokens=N_IMG
    )
    dm.setup("fit")
    assert dm.num_train_samples == 35 and dm.train_batches_per_epoch >= 1


def test_pre_resized_shards_give_the_same_pixels_and_refuse_another_geometry(
    llava_dataset, shards, llama_tokenizer, clip_processor_56, tmp_path
):
    manifest = convert(
        llava_dataset["json"],
        llava_dataset["images"],
        tmp_path / "pre",
        samples_per_shard=5,
        pre_resize=56,
        image_aspect="pad",
        progress=False,
    )
    assert manifest.pre_resized == {"height": 56, "width": 56, "aspect": "pad"}
    assert read_manifest(tmp_path / "pre").pre_resized == manifest.pre_resized

    def pixels_by_id(folder, **kwargs):
        dm = make_dm(folder, llama_tokenizer, clip_processor_56, num_workers=0, **kwargs)
        dm.setup("fit")
        out = {}
        for batch in dm.train_dataloader():
            images = iter(batch["pixel_values"] if batch["pixel_values"] is not None else [])
            for sample_id, ids in zip(batch["ids"], batch["input_ids"], strict=True):
                if (ids == llama_tokenizer.convert_tokens_to_ids("<image>")).any():
                    out[sample_id] = next(images)
        return out

    original, stored = pixels_by_id(shards), pixels_by_id(tmp_path / "pre")
    assert original.keys() == stored.keys() and len(original) == 34
    for sample_id, pixels in original.items():
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, stored[sample_id])

    with pytest.raises(ValueError, match="pre-resized to 56x56 in 'pad'"):
        make_dm(tmp_path / "pre", llama_tokenizer, clip_processor_56, image_aspect="crop").setup("fit")
    processor_84 = type(clip_processor_56)(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84})
    with pytest.raises(ValueError, match="this run preprocesses to 84x84"):
        make_dm(tmp_path / "pre", llama_tokenizer, processor_84).setup("fit")
