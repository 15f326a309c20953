"""Teacher inputs: one image's captions and normalised object boxes, read from JSONL or COCO annotation files.

The teacher sees boxes the way the paper shows them, `category: [x1, y1, x2, y2]` with corners as fractions of
the image size, so every reader here converts to that one form and checks it. A record that cannot be used
(no captions, a box outside the image, an unknown category) is skipped, logged and counted, never guessed at.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    """One object: its category name and corners `[x1, y1, x2, y2]` as fractions of width/height in [0, 1]."""

    category: str
    bbox: tuple[float, float, float, float]


@dataclass
class ImageAnnotation:
    """Everything the teacher is told about one image."""

    image: str
    """Image path as it will appear in the LLaVA record (relative to the image folder)."""
    captions: list[str]
    boxes: list[Box] = field(default_factory=list)

    @property
    def image_id(self) -> str:
        """Record id stem: the image path without extension, slashes made safe."""
        return str(Path(self.image).with_suffix("")).replace("/", "_").replace("\\", "_")


class InvalidAnnotation(ValueError):
    """An input record that cannot be given to the teacher; the message says why."""


def format_context(annotation: ImageAnnotation, include_boxes: bool) -> str:
    """The teacher's user turn: captions one per line, then (optionally) a blank line and boxes one per line."""
    lines = [c.strip() for c in annotation.captions]
    if include_boxes and annotation.boxes:
        lines.append("")
        lines += [f"{b.category}: [{', '.join(f'{v:.3f}' for v in b.bbox)}]" for b in annotation.boxes]
    return "\n".join(lines)


def normalise_box(
    category: str, bbox: list[float], width: float | None = None, height: float | None = None
) -> Box:
    """Check an `[x1, y1, x2, y2]` box and scale it to [0, 1] when the image size is given (pixel input)."""
    if len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
        raise InvalidAnnotation(f"box for {category!r} must be 4 numbers, got {bbox!r}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if width is not None and height is not None:
        if width <= 0 or height <= 0:
            raise InvalidAnnotation(f"image size must be positive, got {width}x{height}")
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    # A box may touch the border after rounding; anything beyond a small tolerance is a wrong unit or order.
    eps = 1e-3
    if not (-eps <= x1 <= x2 <= 1 + eps and -eps <= y1 <= y2 <= 1 + eps):
        raise InvalidAnnotation(
            f"box for {category!r} is not x1<=x2, y1<=y2 inside [0, 1] after normalising: {bbox!r}"
            + ("" if width is not None else " (give width/height for pixel boxes)")
        )
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    return Box(category=str(category), bbox=(clip(x1), clip(y1), clip(x2), clip(y2)))


def annotation_from_dict(record: dict[str, Any]) -> ImageAnnotation:
    """One JSONL record `{image, captions[], boxes[{category, bbox}], width?, height?}` as an annotation.

    Boxes are `[x1, y1, x2, y2]`: fractions in [0, 1], or pixels when the record gives `width` and `height`.
    """
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise InvalidAnnotation("missing 'image' path")
    captions = record.get("captions")
    if not isinstance(captions, list) or not [c for c in captions if isinstance(c, str) and c.strip()]:
        raise InvalidAnnotation(f"{image}: needs a non-empty list of 'captions'")
    boxes = []
    for b in record.get("boxes") or []:
        if not isinstance(b, dict) or "category" not in b or "bbox" not in b:
            raise InvalidAnnotation(f"{image}: each box needs 'category' and 'bbox', got {b!r}")
        boxes.append(normalise_box(b["category"], b["bbox"], record.get("width"), record.get("height")))
    return ImageAnnotation(
        image=image, captions=[c for c in captions if isinstance(c, str) and c.strip()], boxes=boxes
    )


def load_jsonl_annotations(path: str | Path) -> tuple[list[ImageAnnotation], Counter]:
    """Read a JSONL of teacher inputs; returns the usable annotations and a count of skipped records by reason."""
    annotations, skipped = [], Counter()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                annotations.append(annotation_from_dict(json.loads(line)))
            except json.JSONDecodeError as err:
                skipped["not_json"] += 1
                log.warning("%s:%d: skipped, not JSON (%s)", path, line_no, err)
            except InvalidAnnotation as err:
                skipped["invalid"] += 1
                log.warning("%s:%d: skipped, %s", path, line_no, err)
    return annotations, skipped


def load_coco_annotations(
    captions_json: str | Path, instances_json: str | Path | None = None, image_prefix: str = ""
) -> tuple[list[ImageAnnotation], Counter]:
    """Read COCO `captions_*.json` (+ optional `instances_*.json`) into annotations, in image-id order.

    COCO boxes are pixel `[x, y, w, h]`; they become normalised corners. `image_prefix` is prepended to
    `file_name` (e.g. `coco/train2017/`) so records point into the image folder the converter will read.
    Images without captions are skipped and counted.
    """
    caps = json.loads(Path(captions_json).read_text(encoding="utf-8"))
    images = {img["id"]: img for img in caps["images"]}
    captions: dict[int, list[str]] = {i: [] for i in images}
    for a in caps["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    boxes: dict[int, list[Box]] = {i: [] for i in images}
    skipped = Counter()
    if instances_json is not None:
        inst = json.loads(Path(instances_json).read_text(encoding="utf-8"))
        names = {c["id"]: c["name"] for c in inst["categories"]}
        images.update({img["id"]: img for img in inst.get("images", []) if img["id"] not in images})
        for a in inst["annotations"]:
            img = images.get(a["image_id"])
            if img is None or a["category_id"] not in names:
                skipped["unknown_image_or_category"] += 1
                continue
            x, y, w, h = a["bbox"]
            try:
                box = normalise_box(
                    names[a["category_id"]], [x, y, x + w, y + h], img["width"], img["height"]
                )
            except InvalidAnnotation as err:
                skipped["invalid_box"] += 1
                log.warning("COCO annotation %s: skipped, %s", a.get("id"), err)
                continue
            boxes.setdefault(a["image_id"], []).append(box)
    out = []
    for image_id in sorted(images):
        if not captions.get(image_id):
            skipped["no_captions"] += 1
            continue
        out.append(
            ImageAnnotation(
                image=image_prefix + images[image_id]["file_name"],
                captions=captions[image_id],
                boxes=boxes.get(image_id, []),
            )
        )
    if skipped:
        log.warning("COCO input: skipped %s", dict(skipped))
    return out, skipped
