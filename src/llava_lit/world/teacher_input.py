"""The miniature world's ground truth as teacher input, so the whole teacher pipeline runs end to end offline.

A world scene knows every object's shape, color, size and centre, so it yields exactly what the paper gave
its teacher for a COCO image: a few caption sentences and `category: [x1, y1, x2, y2]` boxes. Writing them as
the pipeline's JSONL input shows users the full path: scenes → teacher → LLaVA JSON → shards → training.
"""

from __future__ import annotations

import json
from pathlib import Path

from llava_lit.teacher.annotations import ImageAnnotation, normalise_box
from llava_lit.world.config import WorldConfig
from llava_lit.world.dialogues import POSITION_PHRASES, caption, noun_phrase, ordered
from llava_lit.world.scenes import Scene


def scene_annotation(scene: Scene, cfg: WorldConfig, image: str) -> ImageAnnotation:
    """Captions and boxes of one scene; `image` is the path its LLaVA record will carry."""
    n = len(scene.objects)
    first = caption(scene)
    captions = [
        first[0].upper() + first[1:] + ".",
        f"{n} {'shape' if n == 1 else 'shapes'} on a {scene.background} background.",
        *(
            f"{noun_phrase(o, with_size=True).capitalize()} {POSITION_PHRASES[o.position]}."
            for o in ordered(scene)
        ),
    ]
    boxes = []
    for o in ordered(scene):
        half = cfg.shape_sizes[o.size] / 2  # the shape's bounding box side is its size fraction
        boxes.append(
            normalise_box(f"{o.color} {o.shape}", [o.cx - half, o.cy - half, o.cx + half, o.cy + half])
        )
    return ImageAnnotation(image=image, captions=captions, boxes=boxes)


def write_world_inputs(
    scenes: list[Scene], cfg: WorldConfig, path: str | Path, image_pattern: str = "{scene_id}.png"
) -> int:
    """Write the teacher JSONL for `scenes`; `image_pattern` maps a scene id to its image path. Returns count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for scene in scenes:
            ann = scene_annotation(scene, cfg, image_pattern.format(scene_id=scene.scene_id))
            record = {
                "image": ann.image,
                "captions": ann.captions,
                "boxes": [{"category": b.category, "bbox": [round(v, 4) for v in b.bbox]} for b in ann.boxes],
            }
            f.write(json.dumps(record) + "\n")
    return len(scenes)
