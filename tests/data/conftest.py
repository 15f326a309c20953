"""Small LLaVA-format datasets built on the spot: real photos shipped by pip packages, rendered images, and
deliberately broken entries, written as an official-style JSON list plus image folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

PHOTO_CAPTIONS = {
    "astronaut": "An astronaut in a white suit poses in front of an American flag.",
    "chelsea": "A ginger tabby cat looks to the side.",
    "coffee": "A cup of coffee on a saucer, seen from above.",
    "rocket": "A rocket stands on the launch pad under a blue sky.",
    "china": "A Chinese temple roof among green trees.",
    "flower": "A close-up of a pink flower.",
}
"""Hand-written captions of the real photos used in tests."""

SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def real_photos() -> dict[str, np.ndarray]:
    """Colour photos from scikit-image and scikit-learn (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    sample = load_sample_images()
    for path, array in zip(sample.filenames, sample.images, strict=True):
        photos[Path(path).stem] = array
    return photos


def render_shape(color: str, shape: str, size: tuple[int, int]) -> Image.Image:
    """A rendered image: one coloured shape on a grey background."""
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        draw.ellipse(box, fill=SHAPE_COLORS[color])
    else:
        draw.rectangle(box, fill=SHAPE_COLORS[color])
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def build_llava_dataset(root: Path, *, num_rendered: int = 24, num_text: int = 4) -> dict:
    """Write `root/images/...` and `root/data.json` (LLaVA format). Returns what was written and what is broken."""
    images = root / "images"
    (images / "photos").mkdir(parents=True, exist_ok=True)
    (images / "shapes").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []

    def qa(question: str, answer: str, image: str | None) -> None:
        record = {
            "id": f"s{len(records):04d}",
            "conversations": [
                {"from": "human", "value": (f"{question}\n<image>" if image else question)},
                {"from": "gpt", "value": answer},
            ],
        }
        if image:
            record["image"] = image
        records.append(record)

    for name, array in real_photos().items():
        Image.fromarray(array).save(images / "photos" / f"{name}.jpg", quality=90)
        qa("Describe the image briefly.", PHOTO_CAPTIONS[name], f"photos/{name}.jpg")
    colors, shapes = list(SHAPE_COLORS), ["circle", "square"]
    for i in range(num_rendered):
        color, shape = colors[i % 4], shapes[(i // 4) % 2]
        size = [(640, 480), (480, 640), (336, 336), (500, 300)][i % 4]
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png")][i % 2]
        (images / "shapes" / f"{i}.{ext}").write_bytes(encode(render_shape(color, shape, size), fmt))
        qa("What shape is shown?", f"A {color} {shape} on a grey background.", f"shapes/{i}.{ext}")
    # Unusual but valid modes: 16-bit grayscale PNG, RGBA PNG, palette GIF, CMYK JPEG.
    gray16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    gray16.save(images / "shapes" / "gray16.png")
    qa("What is this?", "A smooth gradient from black to white.", "shapes/gray16.png")
    render_shape("red", "circle", (96, 64)).convert("RGBA").save(images / "shapes" / "rgba.png")
    qa("What shape is shown?", "A red circle.", "shapes/rgba.png")
    render_shape("blue", "square", (80, 80)).convert("P").save(images / "shapes" / "palette.gif")
    qa("What shape is shown?", "A blue square.", "shapes/palette.gif")
    render_shape("green", "square", (80, 60)).convert("CMYK").save(images / "shapes" / "cmyk.jpg")
    qa("What shape is shown?", "A green square.", "shapes/cmyk.jpg")
    # Text-only samples (as ShareGPT in LLaVA-1.5's mix).
    for i in range(num_text):
        qa(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", None)

    valid = len(records)
    # Broken entries: missing file, corrupt bytes, truncated JPEG, empty file, invalid record.
    qa("Describe.", "Never seen.", "photos/does_not_exist.jpg")
    (images / "photos" / "corrupt.jpg").write_bytes(b"this is not an image at all")
    qa("Describe.", "Never seen.", "photos/corrupt.jpg")
    jpeg = (images / "photos" / "chelsea.jpg").read_bytes()
    (images / "photos" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    qa("Describe.", "Never seen.", "photos/truncated.jpg")
    (images / "photos" / "empty.png").write_bytes(b"")
    qa("Describe.", "Never seen.", "photos/empty.png")
    records.append({"id": "no_conversations", "image": "photos/chelsea.jpg"})
    json_path = root / "data.json"
    json_path.write_text(json.dumps(records, indent=1))
    return {
        "json": json_path,
        "images": images,
        "records": records,
        "num_valid": valid,
        "num_text": num_text,
        "broken": {"image_missing": 1, "image_undecodable": 2, "image_empty": 1, "invalid_record": 1},
    }


@pytest.fixture(scope="session")
def llava_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A LLaVA-format JSON + image folder with 38 valid samples (4 text-only) and 5 broken ones."""
    return build_llava_dataset(tmp_path_factory.mktemp("llava_dataset"))


@pytest.fixture(scope="session")
def clip_processor_56():
    """The tiny vision tower's own image processor (56 px, CLIP mean/std), loaded as training loads it."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
