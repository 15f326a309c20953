"""Scenes of the miniature world: random layouts of 1-3 colored shapes, their rendering and their ground truth.

A scene is pure data (`Scene`); `render_scene` draws it, and every caption, question and answer is derived from
the same data in `dialogues.py`, so images and text can never disagree. Held-out scenes are drawn first and
every training/validation scene whose composition (background + objects' color, shape, size, slot) equals a
held-out one is redrawn, so no held-out picture is ever shown in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from llava_lit.world.config import WorldConfig

SLOTS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
"""Position slots: name -> slot centre as (x, y) fractions of the image width/height (y grows downwards)."""

SUPERSAMPLE = 4
"""Shapes are drawn at this multiple of the image size and box-filtered down, for anti-aliased edges."""

BLANK_RGB = (122, 116, 104)
"""The blank image's color: CLIP's normalisation mean, so a blank image is all zeros after preprocessing."""


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene."""

    shape: str
    """Shape name, e.g. "circle"."""

    color: str
    """Color name from the palette, unique within its scene."""

    size: str
    """Size name from `WorldConfig.shape_sizes`, e.g. "small"."""

    position: str
    """Slot name from `SLOTS`, unique within its scene."""

    cx: float
    """Centre x as a fraction of the image width (slot centre + jitter)."""

    cy: float
    """Centre y as a fraction of the image height (slot centre + jitter)."""


@dataclass(frozen=True)
class Scene:
    """A whole picture's ground truth."""

    scene_id: str
    """Unique id, e.g. "train-000012"; also the image's file stem."""

    background: str
    """Background color name."""

    background_rgb: tuple[int, int, int]
    """Actual background RGB (the named color with a small brightness jitter)."""

    objects: tuple[SceneObject, ...]
    """The shapes, in drawing order."""

    def signature(self) -> tuple:
        """The scene's composition without jitter: equal signatures mean "the same picture" for held-out checks."""
        return (self.background, tuple(sorted((o.position, o.color, o.shape, o.size) for o in self.objects)))

    def to_dict(self) -> dict:
        """JSON-able ground truth."""
        return asdict(self)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig, scene_id: str) -> Scene:
    """Draw one random scene: 1..max_objects objects in distinct slots with distinct colors."""
    n = int(rng.integers(1, cfg.max_objects + 1))
    slots = rng.choice(sorted(SLOTS), size=n, replace=False)
    colors = rng.choice(sorted(cfg.palette), size=n, replace=False)
    objects = []
    for slot, color in zip(slots, colors, strict=True):
        sx, sy = SLOTS[str(slot)]
        jx, jy = rng.uniform(-cfg.position_jitter, cfg.position_jitter, size=2)
        objects.append(
            SceneObject(
                shape=str(rng.choice(cfg.shapes)),
                color=str(color),
                size=str(rng.choice(sorted(cfg.shape_sizes))),
                position=str(slot),
                cx=round(float(sx + jx), 4),
                cy=round(float(sy + jy), 4),
            )
        )
    background = str(rng.choice(sorted(cfg.backgrounds)))
    shift = int(rng.integers(-8, 9))
    rgb = tuple(int(np.clip(c + shift, 0, 255)) for c in cfg.backgrounds[background])
    return Scene(scene_id=scene_id, background=background, background_rgb=rgb, objects=tuple(objects))


def render_scene(scene: Scene, cfg: WorldConfig) -> Image.Image:
    """Draw `scene` as an RGB image of `cfg.render_size` pixels square."""
    big = cfg.render_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), tuple(scene.background_rgb))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        side = cfg.shape_sizes[obj.size] * big
        cx, cy, h = obj.cx * big, obj.cy * big, side / 2
        fill = tuple(cfg.palette[obj.color])
        if obj.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "triangle":
            # Apex up, filling the same bounding box as the other shapes; the box centre lies inside.
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
        else:
            raise ValueError(f"scene {scene.scene_id}: no renderer for shape {obj.shape!r}")
    return img.resize((cfg.render_size, cfg.render_size), Image.Resampling.BOX)


def blank_image(cfg: WorldConfig) -> Image.Image:
    """A uniform image without any object, fed instead of the real one for the blanked-image ablation."""
    return Image.new("RGB", (cfg.render_size, cfg.render_size), BLANK_RGB)


def generate_scene_sets(cfg: WorldConfig) -> dict[str, list[Scene]]:
    """Draw the held-out `eval` scenes, then `val` and `train` scenes whose signatures avoid every held-out one.

    Each split has its own random stream derived from the seed, so changing one split's size leaves the
    others' first scenes unchanged.
    """
    cfg.validate()
    out: dict[str, list[Scene]] = {}
    held_out: set[tuple] = set()
    for stream, (split, count) in enumerate(
        [("eval", cfg.n_eval_scenes), ("val", cfg.n_val_scenes), ("train", cfg.n_train_scenes)]
    ):
        rng = np.random.default_rng([cfg.seed, stream])
        scenes: list[Scene] = []
        attempts = 0
        while len(scenes) < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise RuntimeError(f"cannot draw {count} {split} scenes that avoid the held-out ones")
            scene = sample_scene(rng, cfg, f"{split}-{len(scenes):06d}")
            if split != "eval" and scene.signature() in held_out:
                continue
            scenes.append(scene)
        if split == "eval":
            held_out = {s.signature() for s in scenes}
        out[split] = scenes
    return out
