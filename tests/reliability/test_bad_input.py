"""Bad input never costs finished work and is never lost silently.

The converter reads and validates everything before writing, swaps its output in only when complete, counts
malformed records per reason with their place in the file, and keeps image reads inside the image folder.
Training checks shards against their manifest: damaged shards are named, their lost samples counted per
reason, and past `max_lost_fraction` the run stops with a clear message.
"""

from __future__ import annotations

import copy
import csv
import errno
import hashlib
import json
import logging
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from llava_lit.convert import convert, main
from llava_lit.datamodule import DataLossError, LlavaDataModule
from llava_lit.hydra_app import compose_config
from llava_lit.shards import MANIFEST_NAME, ShardWriter, iter_raw_samples, parse_sample, read_manifest
from llava_lit.train import train

N_IMG = 16  # the tiny 56-px / patch-14 tower


def digest(folder: Path) -> dict[str, str]:
    """Every file of `folder` by name, as its sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    """Hidden siblings a swap of `out` leaves behind when it does not clean up (`.out.tmp-*`, `.out.old`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def cli(json_path: Path, images: Path, out: Path, *extra: str) -> None:
    """`python -m llava_lit.convert json=... image_folder=... out=... shard_size=10 EXTRA...`, in this process."""
    overrides = [f"json={json_path}", f"image_folder={images}", f"out={out}", "shard_size=10", *extra]
    main(compose_config("convert", overrides))


# --- the converter -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_conversion(llava_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "shards"
    convert(llava_dataset["json"], llava_dataset["images"], out, samples_per_shard=10, progress=False)
    return out


@pytest.fixture()
def previous(good_conversion, tmp_path) -> Path:
    """A copy of a good conversion, as a user's `--out` holds it before the next run."""
    out = tmp_path / "out"
    shutil.copytree(good_conversion, out)
    return out


def _syntax_error(text: str) -> tuple[str, int, int]:
    """The JSON with one comma dropped; the parser stops at the next line's first character."""
    lines = text.split("\n")
    k = lines.index('  "id": "s0002",')
    lines[k] = lines[k].rstrip(",")
    following = lines[k + 1]
    return "\n".join(lines), k + 2, len(following) - len(following.lstrip()) + 1


def _truncated(text: str) -> tuple[str, int, int]:
    """The JSON cut after the record of s0010, as an interrupted copy leaves it; parsing stops at its end."""
    cut = text.index("\n },", text.index('"id": "s0010"')) + len("\n },")
    lines = text[:cut].split("\n")
    return text[:cut], len(lines), len(lines[-1]) + 1


@pytest.mark.parametrize("damage", [_syntax_error, _truncated], ids=["syntax_error", "truncated"])
def test_json_that_does_not_parse_is_refused_and_the_previous_conversion_stays(
    llava_dataset, previous, tmp_path, damage
):
    before = digest(previous)
    text, line, column = damage(llava_dataset["json"].read_text())
    bad = tmp_path / "data.json"
    bad.write_text(text)
    with pytest.raises(SystemExit) as err:
        cli(bad, llava_dataset["images"], previous)
    assert f"{bad}:{line}:{column}: invalid JSON" in str(err.value)
    assert digest(previous) == before
    assert leftovers(previous) == []


def test_a_failure_while_writing_keeps_the_previous_conversion(llava_dataset, previous, monkeypatch):
    before = digest(previous)
    real_write = ShardWriter.write
    calls = 0

    def write_until_the_disk_is_full(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 12:  # in the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", write_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left"):
        # Another shard size than the previous run's, so even the first new shard differs from the old one.
        convert(llava_dataset["json"], llava_dataset["images"], previous, samples_per_shard=7, progress=False)
    assert calls == 12
    assert digest(previous) == before
    assert leftovers(previous) == []


def test_jsonl_lines_that_do_not_parse_are_counted_with_their_line_numbers(llava_dataset, tmp_path):
    photos = copy.deepcopy(llava_dataset["records"][:4])
    # U+2028 is a line break to str.splitlines but plain text inside a JSON string: it must not shift lines.
    photos[2]["conversations"][1]["value"] += "\u2028Second line."
    missing = {**copy.deepcopy(photos[0]), "id": "missing", "image": "photos/nope.jpg"}
    lines = [
        json.dumps(photos[0]).encode(),  # 1
        b"",  # 2: blank lines are passed over but counted
        json.dumps(photos[1]).encode(),  # 3
        b'{"id": "cut", "conversations": [',  # 4: does not parse
        b"   ",  # 5
        json.dumps(photos[2], ensure_ascii=False).encode(),  # 6
        b'{"id": "latin-1", "conversations": "caf\xe9"}',  # 7: not UTF-8
        json.dumps(photos[3]).encode() + b"\r",  # 8: a CRLF line ending
        json.dumps(missing).encode(),  # 9
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    manifest = convert(path, llava_dataset["images"], tmp_path / "out", progress=False)
    assert manifest.num_samples == 4
    assert manifest.skipped == {"image_missing": 1, "invalid_json": 2}
    bad_lines = manifest.skipped_examples["invalid_json"]
    assert bad_lines[0].startswith("data.jsonl:4: ") and bad_lines[1].startswith("data.jsonl:7: ")
    assert "not UTF-8" in bad_lines[1]
    assert manifest.skipped_examples["image_missing"] == ["data.jsonl:9 (id 'missing'): photos/nope.jpg"]
    values = {
        parse_sample(raw)[0]["id"]: parse_sample(raw)[0]["conversations"][1]["value"]
        for raw in iter_raw_samples(tmp_path / "out" / manifest.shards[0].name)
    }
    assert values[photos[2]["id"]].endswith("\u2028Second line.")


def test_lone_surrogates_are_counted_and_skipped(llava_dataset, tmp_path):
    records = copy.deepcopy(llava_dataset["records"][:6])
    records[0]["id"] = "bad\ud800id"
    records[2]["conversations"][1]["value"] = "A cat\udfff."
    records[4]["image"] = "photos/\ud800.jpg"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))  # valid JSON: the surrogates are written as \\ud800 escapes
    manifest = convert(path, llava_dataset["images"], tmp_path / "out", samples_per_shard=2, progress=False)
    assert manifest.skipped == {"invalid_unicode": 3}
    assert manifest.num_samples == 3
    assert read_manifest(tmp_path / "out") == manifest  # the reported examples are valid UTF-8 JSON
    examples = manifest.skipped_examples["invalid_unicode"]
    assert [e.split(" ")[0] for e in examples] == ["data.json[0]", "data.json[2]", "data.json[4]"]
    assert (
        "id: lone surrogate" in examples[0] and "turn 1 value" in examples[1] and "image path" in examples[2]
    )


def test_image_paths_must_stay_inside_the_image_folder(tmp_path):
    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(images / "inside.png")
    Image.new("RGB", (32, 24), (30, 30, 200)).save(outside / "secret.png")
    (images / "alias.png").symlink_to(images / "inside.png")
    (images / "escape.png").symlink_to(outside / "secret.png")
    (images / "linked").symlink_to(outside, target_is_directory=True)
    paths = {
        "inside": "inside.png",
        "dotdot_inside": "sub/../inside.png",
        "alias": "alias.png",
        "parent": "../outside/secret.png",
        "absolute": str(outside / "secret.png"),
        "symlink": "escape.png",
        "linked_folder": "linked/secret.png",
    }
    records = [
        {
            "id": name,
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "A colour."},
            ],
        }
        for name, rel in paths.items()
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    manifest = convert(path, images, tmp_path / "confined", progress=False)
    assert manifest.skipped == {"image_outside_folder": 4}
    assert manifest.num_samples == 3
    named = [e.split(": ")[0] for e in manifest.skipped_examples["image_outside_folder"]]
    assert named == [
        "data.json[3] (id 'parent')",
        "data.json[4] (id 'absolute')",
        "data.json[5] (id 'symlink')",
        "data.json[6] (id 'linked_folder')",
    ]
    written = {
        parse_sample(raw)[0]["id"]
        for shard in manifest.shards
        for raw in iter_raw_samples(tmp_path / "confined" / shard.name)
    }
    assert written == {"inside", "dotdot_inside", "alias"}

    cli(path, images, tmp_path / "allowed", "allow_outside_image_folder=true")
    allowed = read_manifest(tmp_path / "allowed")
    assert allowed.num_samples == 7 and not allowed.skipped


def test_an_out_folder_with_other_files_is_refused(llava_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "shard-000000.tar").write_bytes(b"an older shard")
    with pytest.raises(SystemExit, match=r"not a previous conversion \(notes.txt\)"):
        cli(llava_dataset["json"], llava_dataset["images"], out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "shard-000000.tar").read_bytes() == b"an older shard"
    assert leftovers(out) == []


def test_a_run_that_converts_nothing_keeps_the_previous_conversion(llava_dataset, previous, tmp_path):
    before = digest(previous)
    photos = tmp_path / "photos.json"
    photos.write_text(json.dumps(llava_dataset["records"][:6]))
    wrong_folder = tmp_path / "not_the_images"
    wrong_folder.mkdir()
    with pytest.raises(SystemExit, match="no record could be converted .*image_missing"):
        cli(photos, wrong_folder, previous)
    assert digest(previous) == before
    assert leftovers(previous) == []


# --- damaged shards at training time ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(llava_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    convert(llava_dataset["json"], llava_dataset["images"], out, samples_per_shard=5, progress=False)
    return out  # 38 samples in 8 shards (5 x 7 + 3); shard 0 holds the photos 0-4 (a .jpg and a .json each)


def _offsets(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def cut_mid_member(path: Path) -> None:
    """Cut inside the data of sample 2's json: samples 0 and 1 are read, then a read error."""
    _cut(path, _offsets(path)["000000002.json"].offset_data + 10)


def cut_between_samples(path: Path) -> None:
    """Cut before sample 3's first member: a well-formed but short tar of 3 samples."""
    _cut(path, _offsets(path)["000000003.jpg"].offset)


def cut_between_members_of_a_sample(path: Path) -> None:
    """Cut between sample 2's image and its json: samples 0 and 1, then half a sample."""
    _cut(path, _offsets(path)["000000002.json"].offset)


def fewer_samples_than_the_manifest(path: Path) -> None:
    """Replace the shard by a complete tar of its first 3 samples (the manifest still says 5)."""
    samples = [parse_sample(raw) + (raw["__key__"],) for raw in iter_raw_samples(path)][:3]
    writer = ShardWriter(path.parent / "rewrite", samples_per_shard=5)
    for record, images, key in samples:
        writer.write(key, record, dict(zip(record["image_keys"], images, strict=True)))
    writer.close()
    (path.parent / "rewrite" / path.name).replace(path)
    (path.parent / "rewrite").rmdir()


DAMAGE: dict[str, tuple[Callable[[Path], None], dict[str, int]]] = {
    "cut_mid_member": (cut_mid_member, {"shard_unreadable": 3}),
    "cut_between_samples": (cut_between_samples, {"shard_short": 2}),
    "cut_between_members_of_a_sample": (cut_between_members_of_a_sample, {"shard_short": 3}),
    "fewer_samples_than_the_manifest": (fewer_samples_than_the_manifest, {"shard_short": 2}),
}
"""Each way to damage shard 0, and the samples of it the reader loses, per reason."""


def as_version_1_manifest(folder: Path) -> None:
    """Rewrite the manifest of `folder` in its version-1 form, which records no shard sizes."""
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["version"] = 1
    for shard in data["shards"]:
        shard.pop("size_bytes", None)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


def damaged_copy(shards: Path, folder: Path, damage: str, *, sizes_in_manifest: bool = True) -> Path:
    """A copy of `shards` with shard 0 damaged; without sizes, the manifest is the version-1 form."""
    shutil.copytree(shards, folder)
    DAMAGE[damage][0](folder / "shard-000000.tar")
    if not sizes_in_manifest:
        as_version_1_manifest(folder)
    return folder


def make_dm(folder: Path, tokenizer, processor, **kwargs) -> LlavaDataModule:
    settings = dict(
        sources=[{"path": str(folder), "weight": 1.0}],
        template="vicuna_v1",
        max_length=256,
        micro_batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        seed=3,
        pin_memory=False,
    )
    settings.update(kwargs)
    return LlavaDataModule(tokenizer=tokenizer, image_processor=processor, num_image_tokens=N_IMG, **settings)


def lost_counts(dm: LlavaDataModule) -> dict[str, int]:
    return {k: v for k, v in dm.skip_counts.items() if k.startswith("shard_") and v}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_is_found_at_setup(
    damage, shards, llama_tokenizer, clip_processor_56, tmp_path, caplog
):
    folder = damaged_copy(shards, tmp_path / "shards", damage)
    expected = DAMAGE[damage][1]
    lost = sum(expected.values())
    # Lenient: 10 % of 38 samples (3) may be lost. The epoch completes, its losses counted per reason.
    dm = make_dm(folder, llama_tokenizer, clip_processor_56, max_lost_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="llava_lit.datamodule"):
        dm.setup("fit")
        batches = list(dm.train_dataloader())
    assert len(batches) == dm.train_batches_per_epoch
    assert sum(len(b["ids"]) for b in batches) == 38
    assert len({i for b in batches for i in b["ids"]}) == 38 - lost
    assert lost_counts(dm) == expected
    assert dm.skip_counts["repeated_to_fill"] == lost
    assert [d.path for d in dm.damaged_shards] == [str(folder / "shard-000000.tar")]
    assert "damaged shards lose up to" in caplog.text  # at setup
    assert f"samples of shard {folder / 'shard-000000.tar'}" in caplog.text  # while reading
    # Strict: 5 % of 38 (1 sample) is less than the loss; setup stops, naming the shard, before any batch.
    strict = make_dm(folder, llama_tokenizer, clip_processor_56, max_lost_fraction=0.05)
    with pytest.raises(DataLossError, match=r"shard-000000.tar: \d of 5 samples readable") as err:
        strict.setup("fit")
    assert f"lose up to {lost} samples" in str(err.value) and "max_lost_fraction=0.05" in str(err.value)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_is_found_while_reading(
    damage, workers, shards, llama_tokenizer, clip_processor_56, tmp_path
):
    # A version-1 manifest records no sizes: setup cannot see the damage, the reader counts it.
    folder = damaged_copy(shards, tmp_path / "shards", damage, sizes_in_manifest=False)
    expected = DAMAGE[damage][1]
    lost = sum(expected.values())
    dm = make_dm(folder, llama_tokenizer, clip_processor_56, max_lost_fraction=0.1, num_workers=workers)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["ids"]) for b in batches) == 38 and len(batches) == dm.train_batches_per_epoch
    assert len({i for b in batches for i in b["ids"]}) == 38 - lost
    assert lost_counts(dm) == expected
    assert dm.skip_counts["repeated_to_fill"] == lost
    assert dm.damaged_shards == []  # nothing to see at setup

    strict = make_dm(folder, llama_tokenizer, clip_processor_56, max_lost_fraction=0.05, num_workers=workers)
    strict.setup("fit")
    message = data_loss_of(strict.train_dataloader())
    assert "max_lost_fraction=0.05" in message and str(folder / "shard-000000.tar") in message


def data_loss_of(loader) -> str:
    """The `DataLossError` message of reading `loader` to the end. Caught here, so the iterator (and its worker
    processes) is released when this returns rather than kept alive by the test's traceback."""
    try:
        list(loader)
    except DataLossError as err:
        return str(err)
    raise AssertionError("reading the shards raised no DataLossError")


def test_mid_epoch_resume_past_a_damaged_shard(shards, llama_tokenizer, clip_processor_56, tmp_path):
    folder = damaged_copy(shards, tmp_path / "shards", "cut_mid_member")

    def loader(resume: int):
        dm = make_dm(folder, llama_tokenizer, clip_processor_56, max_lost_fraction=0.1)
        dm.setup("fit")
        out = dm.train_dataloader()
        out.resume_fn = lambda: resume
        return out, dm

    whole, _ = loader(0)
    ids = [b["ids"] for b in whole]
    resumed, dm = loader(4)
    resumed_ids = [b["ids"] for b in resumed]
    assert len(resumed_ids) == len(ids) - 4
    # The same samples in the same order; only the repeats standing in for the 3 lost ones may differ.
    flat, resumed_flat = [i for b in ids[4:] for i in b], [i for b in resumed_ids for i in b]
    assert len(flat) == len(resumed_flat) and flat[:-3] == resumed_flat[:-3]
    assert lost_counts(dm) == {"shard_unreadable": 3}


def _damaged_training_shards(tiny_shards, folder: Path, *, sizes_in_manifest: bool) -> Path:
    """The tiny `align` shards (4 x 8 samples) with shard 1 cut inside its 6th sample: 3 samples lost."""
    shutil.copytree(tiny_shards["align"], folder)
    shard = folder / "shard-000001.tar"
    _cut(shard, _offsets(shard)["000000013.png"].offset)  # between the json and the png of sample 13
    if not sizes_in_manifest:
        as_version_1_manifest(folder)
    return folder


@pytest.mark.parametrize("sizes_in_manifest", [True, False], ids=["found_at_setup", "found_while_reading"])
def test_training_stops_on_a_damaged_shard(compose_train, tiny_shards, tmp_path, sizes_in_manifest):
    folder = _damaged_training_shards(tiny_shards, tmp_path / "damaged", sizes_in_manifest=sizes_in_manifest)
    cfg = compose_train(
        f"data.sources=[{{path: {folder}, weight: 1.0}}]",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
        stage="align",
    )
    # The default bound, 1 % of 32 samples, allows no loss at all.
    with pytest.raises(DataLossError, match="shard-000001.tar") as err:
        train(cfg)
    assert "max_lost_fraction=0.01" in str(err.value)


def test_training_within_the_bound_completes_and_logs_the_loss(compose_train, tiny_shards, tmp_path):
    folder = _damaged_training_shards(tiny_shards, tmp_path / "damaged", sizes_in_manifest=True)
    cfg = compose_train(
        f"data.sources=[{{path: {folder}, weight: 1.0}}]",
        "data.max_lost_fraction=0.2",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        stage="align",
    )
    train(cfg)
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["data/skipped/shard_short"]) for r in rows if r.get("data/skipped/shard_short")]
    assert logged == [3.0]
    assert [
        float(r["data/skipped/repeated_to_fill"]) for r in rows if r.get("data/skipped/repeated_to_fill")
    ] == [3.0]
