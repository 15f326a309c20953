"""`python -m llava_lit.convert` as a Hydra app: every setting a `key=value` override, errors as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf.errors import ValidationError

from llava_lit.convert import main
from llava_lit.hydra_app import compose_config
from llava_lit.shards import read_manifest

SRC = Path(__file__).resolve().parents[2] / "src"


def test_pre_resize_and_aspect_are_keys(llava_dataset, tmp_path):
    overrides = [
        f"json={llava_dataset['json']}",
        f"image_folder={llava_dataset['images']}",
        f"out={tmp_path / 'shards'}",
        "pre_resize=56",
        "image_aspect=crop",
        "num_threads=1",
    ]
    manifest = main(compose_config("convert", overrides))
    assert manifest.num_samples == llava_dataset["num_valid"]
    assert read_manifest(tmp_path / "shards").pre_resized == {"height": 56, "width": 56, "aspect": "crop"}


def test_a_setting_of_the_wrong_type_is_refused(llava_dataset, tmp_path):
    overrides = [
        f"json={llava_dataset['json']}",
        f"image_folder={tmp_path}",
        f"out={tmp_path}",
        "shard_size=many",
    ]
    with pytest.raises(ValidationError, match="shard_size"):
        main(compose_config("convert", overrides))


@pytest.mark.slow
def test_a_refused_out_folder_ends_the_command_with_its_message(llava_dataset, tmp_path):
    """Run as a user does: status 1, the converter's message, and nothing written (no run folder or log)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_lit.convert",
            f"json={llava_dataset['json']}",
            f"image_folder={llava_dataset['images']}",
            f"out={out}",
        ],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert f"error: out={out} holds files that are not a previous conversion (notes.txt)" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert list(cwd.iterdir()) == []


def test_pre_resize_refuses_anyres(llava_dataset, tmp_path):
    """AnyRes tiles are cut from each image at its own size, so one stored view cannot serve it."""
    overrides = [
        f"json={llava_dataset['json']}",
        f"image_folder={llava_dataset['images']}",
        f"out={tmp_path / 'shards'}",
        "pre_resize=56",
        "image_aspect=anyres",
    ]
    with pytest.raises(ValueError, match="convert without pre_resize"):
        main(compose_config("convert", overrides))
    assert not (tmp_path / "shards").exists()


def _same_question_dataset(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """One record per image size (height, width), all with the same conversation."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    records = []
    for i, (height, width) in enumerate(sizes):
        Image.new("RGB", (width, height), (200, 30, 30)).save(root / "images" / f"{i}.png")
        conversation = [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A red square."},
        ]
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": conversation})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_anyres_length_statistics_count_each_image_from_its_size(llama_tokenizer_dir, tmp_path):
    """With grid_pinpoints every image's run is what AnyRes tiling gives its size, not one view's tokens."""
    from llava_lit.image_tiling import AnyResSettings, TileLayout

    sizes = [(28, 28), (28, 84), (60, 30), (90, 90)]
    pinpoints = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
    data = _same_question_dataset(tmp_path / "data", sizes)
    common = [
        f"json={data}",
        f"image_folder={tmp_path / 'data' / 'images'}",
        f"tokenizer={llama_tokenizer_dir}",
    ]
    common += ["num_image_tokens=4", "num_threads=1", "max_length=256"]
    one_view = main(compose_config("convert", [*common, f"out={tmp_path / 'one'}"])).token_lengths
    tiled = main(
        compose_config(
            "convert",
            [*common, f"out={tmp_path / 'tiled'}", f"grid_pinpoints={pinpoints}", "tile_size=28"],
        )
    ).token_lengths

    layout = TileLayout(AnyResSettings(grid_pinpoints=pinpoints), base=28, feature_grid=2)
    counts = [layout.num_tokens(h, w) for h, w in sizes]
    text = one_view.max - 4  # every record has the same text and, in one view, 4 image tokens
    assert one_view.min == one_view.max and one_view.anyres is None
    assert (tiled.min, tiled.max) == (text + min(counts), text + max(counts))
    assert tiled.max > one_view.max and tiled.skipped == {} and tiled.count == len(sizes)
    assert tiled.anyres == {"grid_pinpoints": pinpoints, "tile_size": 28}
    assert read_manifest(tmp_path / "tiled").token_lengths == tiled

    # A max_length between the two counts skips only what the tiles lengthen past it.
    short = main(
        compose_config(
            "convert",
            [
                *common,
                f"out={tmp_path / 'short'}",
                f"grid_pinpoints={pinpoints}",
                "tile_size=28",
                f"max_length={text + min(counts)}",
            ],
        )
    ).token_lengths
    assert sum(short.skipped.values()) == sum(c > min(counts) for c in counts)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["num_image_tokens=5"], "a square number"),
        (["tile_size=30"], "multiple of the tower's input size 30"),
    ],
)
def test_anyres_statistics_settings_that_cannot_tile_are_refused(llava_dataset, tmp_path, settings, message):
    overrides = [
        f"json={llava_dataset['json']}",
        f"image_folder={llava_dataset['images']}",
        f"out={tmp_path / 'shards'}",
        "grid_pinpoints=[[28,56],[56,28]]",
        "tile_size=28",
        "num_image_tokens=4",
        *settings,
    ]
    with pytest.raises(SystemExit, match=message):
        main(compose_config("convert", overrides))
    assert not (tmp_path / "shards").exists()
