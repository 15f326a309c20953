"""Teacher inputs: JSONL and COCO readers, box normalisation, the user turn, and the prompt folders."""

from __future__ import annotations

import json

import pytest

from llava_lit.teacher.annotations import (
    ImageAnnotation,
    format_context,
    load_coco_annotations,
    load_jsonl_annotations,
    normalise_box,
)
from llava_lit.teacher.prompts import DATA_TYPES, load_prompt_set, load_prompt_sets


def test_jsonl_reads_normalised_and_pixel_boxes_and_counts_skips(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        {
            "image": "a/1.png",
            "captions": ["A red circle."],
            "boxes": [{"category": "circle", "bbox": [0.1, 0.2, 0.5, 0.6]}],
        },
        {
            "image": "2.png",
            "captions": ["Two squares."],
            "width": 200,
            "height": 100,
            "boxes": [{"category": "square", "bbox": [20, 10, 100, 100]}],
        },
        {"image": "3.png", "captions": []},
        {"image": "4.png", "captions": ["x"], "boxes": [{"category": "sq", "bbox": [20, 10, 100, 100]}]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    annotations, skipped = load_jsonl_annotations(path)
    assert [a.image for a in annotations] == ["a/1.png", "2.png"]
    assert annotations[0].image_id == "a_1"
    assert annotations[1].boxes[0].bbox == pytest.approx((0.1, 0.1, 0.5, 1.0))
    assert skipped == {"invalid": 2, "not_json": 1}


def test_box_order_is_checked():
    with pytest.raises(ValueError, match="x1<=x2"):
        normalise_box("c", [0.5, 0.1, 0.2, 0.3])


def test_coco_reader(tmp_path):
    caps = {
        "images": [
            {"id": 7, "file_name": "7.jpg", "width": 100, "height": 50},
            {"id": 8, "file_name": "8.jpg", "width": 10, "height": 10},
        ],
        "annotations": [{"image_id": 7, "caption": "A dog."}, {"image_id": 7, "caption": "A brown dog."}],
    }
    inst = {
        "images": caps["images"],
        "categories": [{"id": 18, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 5, 40, 20]}],
    }
    (tmp_path / "c.json").write_text(json.dumps(caps))
    (tmp_path / "i.json").write_text(json.dumps(inst))
    annotations, skipped = load_coco_annotations(tmp_path / "c.json", tmp_path / "i.json", "coco/train2017/")
    assert len(annotations) == 1 and skipped == {"no_captions": 1}
    ann = annotations[0]
    assert ann.image == "coco/train2017/7.jpg" and ann.captions == ["A dog.", "A brown dog."]
    assert ann.boxes[0].bbox == pytest.approx((0.1, 0.1, 0.5, 0.5))


def test_context_format_is_the_papers():
    ann = ImageAnnotation("1.png", ["A red circle.", "A circle."], [])
    ann.boxes.append(normalise_box("circle", [0.1, 0.25, 0.5, 0.6]))
    assert (
        format_context(ann, include_boxes=True)
        == "A red circle.\nA circle.\n\ncircle: [0.100, 0.250, 0.500, 0.600]"
    )
    assert format_context(ann, include_boxes=False) == "A red circle.\nA circle."


def test_packaged_prompts_load_and_version_tracks_edits(tmp_path):
    sets = load_prompt_sets(None, list(DATA_TYPES))
    for name, ps in sets.items():
        assert ps.examples, name
        msgs = ps.messages("ctx")
        assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "ctx"}
        assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(ps.examples)
    assert len(sets["detail_description"].instructions) >= 10
    # Editing a prompt file changes the version, and so the cache keys of every reply it produced.
    folder = tmp_path / "conversation"
    folder.mkdir()
    (folder / "system_message.txt").write_text("be brief")
    v1 = load_prompt_set(folder).version
    (folder / "system_message.txt").write_text("be very brief")
    assert load_prompt_set(folder).version != v1
    (folder / "000_caps.txt").write_text("a circle")
    with pytest.raises(FileNotFoundError, match="000_conv.txt"):
        load_prompt_set(folder)
