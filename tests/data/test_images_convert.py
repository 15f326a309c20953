"""Image decoding/aspect handling on real photos, and the converter on a LLaVA folder with broken entries."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lit.convert import convert, main
from llava_lit.hydra_app import compose_config
from llava_lit.images import ImageDecodeError, ImageLoader, decode_image, expand_to_square, mean_fill_color
from llava_lit.shards import iter_raw_samples, parse_sample, read_manifest

from .conftest import encode, render_shape


def test_pad_never_crops_a_640x480_image(clip_processor_56):
    fill = mean_fill_color(clip_processor_56)
    assert fill == (122, 116, 104)
    image = render_shape("red", "square", (640, 480))
    square = expand_to_square(image, fill)
    assert square.size == (640, 640)
    array = np.asarray(square)
    assert (array[:80] == fill).all() and (array[560:] == fill).all()  # 80 px bands above and below
    assert np.array_equal(array[80:560], np.asarray(image))  # the whole image, untouched
    tall = expand_to_square(render_shape("red", "square", (480, 640)), fill)
    assert (np.asarray(tall)[:, :80] == fill).all()


def test_aspect_modes_on_a_real_photo(clip_processor_56):
    from sklearn.datasets import load_sample_images

    china = load_sample_images().images[0]  # 427 x 640 photo
    data = encode(Image.fromarray(china), "JPEG")
    for aspect in ("pad", "crop", "resize"):
        pixels = ImageLoader(clip_processor_56, aspect=aspect)(data)
        assert pixels.shape == (3, 56, 56) and pixels.dtype == torch.uint8
    # With pad, the top rows are the mean colour, which CLIP normalisation maps to about zero.
    padded = ImageLoader(clip_processor_56, aspect="pad", output="normalized")(data)
    assert padded[:, 0, :].abs().max() < 0.05
    cropped = ImageLoader(clip_processor_56, aspect="crop", output="normalized")(data)
    assert cropped[:, 0, :].abs().max() > 0.05
    with pytest.raises(ValueError):
        ImageLoader(clip_processor_56, aspect="square")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_modes_decode_to_rgb(mode):
    base = render_shape("green", "circle", (40, 30))
    if mode == "I;16":
        gray = np.asarray(base.convert("L"), dtype=np.uint16)
        image = Image.fromarray(gray * 257)  # the same picture on the full 16-bit range
    else:
        image = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    rgb = decode_image(encode(image, fmt))
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    if mode == "I;16":  # rescaled to 8 bits, not clipped at 255
        assert np.abs(np.asarray(rgb)[..., 0].astype(int) - gray).max() <= 1


def test_bad_images_raise_reasons():
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"")
    assert err.value.reason == "image_empty"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"GIF89a garbage")
    assert err.value.reason == "image_undecodable"
    big = encode(Image.new("L", (2000, 1000)), "PNG")  # small file, 2 M pixels
    with pytest.raises(ImageDecodeError) as err:
        decode_image(big, max_pixels=1_000_000)
    assert err.value.reason == "image_too_large"
    assert decode_image(big, max_pixels=2_000_000).size == (2000, 1000)


def test_convert_writes_shards_manifest_and_reports_broken_entries(llava_dataset, llama_tokenizer, tmp_path):
    manifest = convert(
        llava_dataset["json"],
        llava_dataset["images"],
        tmp_path / "a",
        samples_per_shard=8,
        tokenizer=llama_tokenizer,
        num_image_tokens=16,
        progress=False,
    )
    assert manifest.num_samples == llava_dataset["num_valid"]
    assert manifest.num_text_samples == llava_dataset["num_text"]
    assert manifest.num_image_samples == llava_dataset["num_valid"] - llava_dataset["num_text"]
    assert manifest.skipped == llava_dataset["broken"]
    assert "photos/does_not_exist.jpg" in manifest.skipped_examples["image_missing"][0]
    assert [s.num_samples for s in manifest.shards] == [8, 8, 8, 8, 6]
    assert manifest.token_lengths is not None and manifest.token_lengths.count == manifest.num_samples
    assert manifest.token_lengths.min > 16  # image run expanded
    assert read_manifest(tmp_path / "a") == manifest

    # Every written sample round-trips: record JSON + the original image bytes, nothing dropped or duplicated.
    by_id = {r["id"]: r for r in llava_dataset["records"]}
    seen = []
    for shard in manifest.shards:
        for raw in iter_raw_samples(tmp_path / "a" / shard.name):
            record, images = parse_sample(raw)
            source = by_id[record["id"]]
            assert record["conversations"] == source["conversations"]
            if "image" in source:
                assert images == [(llava_dataset["images"] / source["image"]).read_bytes()]
            else:
                assert images == []
            seen.append(record["id"])
    assert len(seen) == len(set(seen)) == manifest.num_samples

    # Deterministic: a second run gives byte-identical shards and manifest.
    again = convert(
        llava_dataset["json"],
        llava_dataset["images"],
        tmp_path / "b",
        samples_per_shard=8,
        tokenizer=llama_tokenizer,
        num_image_tokens=16,
        progress=False,
        num_threads=1,
    )
    assert again == manifest

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_convert_cli(llava_dataset, llama_tokenizer_dir, tmp_path, capsys):
    overrides = [
        f"json={llava_dataset['json']}",
        f"image_folder={llava_dataset['images']}",
        f"out={tmp_path}",
        "shard_size=20",
        f"tokenizer={llama_tokenizer_dir}",
        "template=plain",
        "num_image_tokens=4",
    ]
    manifest = main(compose_config("convert", overrides))
    out = capsys.readouterr().out
    assert f"{llava_dataset['num_valid']} samples" in out and "image_missing" in out
    assert len(manifest.shards) == 2
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["token_lengths"]["template"] == "plain"


def test_decode_bounds_before_decoding():
    # A PNG header claiming 100k x 100k pixels is refused from its header alone.
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(buf.getvalue(), max_pixels=10_000_000)
    assert err.value.reason == "image_too_large"
