"""`python -m llava_lit.convert` as a Hydra app: every setting a `key=value` override, errors as before."""

from __future__ import annotations

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
