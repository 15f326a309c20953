"""Settings of the offline miniature world: one dataclass, so a build is fully described (and fingerprinted) by it.

`WorldConfig()` is the default world that `stage=align`/`stage=finetune` train on; `WorldConfig.ci()` is the same
world in miniature (fewer scenes, smaller backbones, fewer steps) for tests and CI. Both go through the same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from llava_lit.cpu_bf16 import has_native_bf16

WORLD_FORMAT_VERSION = 11
"""Bumped whenever the build code changes what it writes for a given config, so cached worlds are rebuilt."""


UNHASHED_DEFAULTS = {"render_scale": 1, "backbones_from": None}
"""Settings left out of the fingerprint at these values, which build what was built before they existed (so
cached worlds stay valid)."""


def _default_palette() -> dict[str, list[int]]:
    return {
        "red": [220, 38, 38],
        "green": [34, 160, 60],
        "blue": [37, 84, 225],
        "yellow": [242, 208, 34],
        "purple": [140, 58, 190],
        "orange": [245, 136, 28],
    }


def _default_backgrounds() -> dict[str, list[int]]:
    # Neutral tones only, so no background can be mistaken for an object's color.
    return {
        "white": [246, 246, 246],
        "light gray": [196, 196, 196],
        "gray": [128, 128, 128],
        "dark gray": [64, 64, 64],
        "black": [18, 18, 18],
        "beige": [232, 220, 190],
    }


@dataclass
class WorldConfig:
    """Everything that determines a world build; two builds with equal configs are identical."""

    seed: int = 0
    """Seed of every random choice: scenes, dialogues, backbone initialisation and batch order."""

    image_size: int = 84
    """Side of the square rendered images in pixels (and the CLIP tower's input size)."""

    patch_size: int = 12
    """CLIP patch size; (image_size / patch_size)^2 is the number of image tokens the LLaVA sees (49 here).

    An odd grid (7 x 7) puts every slot centre (0.2, 0.5, 0.8 of the width) inside one patch; on an even grid the
    centre slot falls on the corner of four patches and its object is cut in quarters, which the tiny tower's
    patch tokens then cannot tell the shape of (patch-probe shape 0.76 at 96 px / 8 x 8 vs 0.94 at 84 px / 7 x 7).
    """

    shape_sizes: dict[str, float] = field(default_factory=lambda: {"small": 0.11, "large": 0.15})
    """Named object sizes as a fraction of the image width (extent of the shape's bounding box)."""

    render_scale: int = 1
    """Scenes are drawn at `render_scale * image_size` pixels square. Above 1 (the `highres` preset) the tower
    reads a scene either downscaled to its input (one view) or in tiles of its input size (AnyRes)."""

    backbones_from: str | None = None
    """A built world whose tokenizer, CLIP and LLaMA this world reuses instead of pretraining its own. The
    `highres` preset reuses the default world's: that tower was pretrained on objects of the pixel size that
    AnyRes tiles of the high-resolution scenes show."""

    position_jitter: float = 0.04
    """Random offset of an object's centre from its slot centre, as a fraction of the image width."""

    palette: dict[str, list[int]] = field(default_factory=_default_palette)
    """Object colors: name -> RGB. Names are the words used in captions, questions and answers."""

    backgrounds: dict[str, list[int]] = field(default_factory=_default_backgrounds)
    """Background colors: name -> RGB (neutral, distinct from the palette)."""

    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    """Shape names; each must have a renderer in `scenes.py`."""

    max_objects: int = 3
    """Scenes hold 1..max_objects objects, each in its own position slot and with its own color."""

    n_train_scenes: int = 6000
    """Scenes rendered for training (stage-1 captions and stage-2 instructions share them)."""

    n_val_scenes: int = 200
    """Scenes for the validation shards (`val_align`, `val_finetune`)."""

    n_eval_scenes: int = 400
    """Held-out scenes for `eval/`: their object layouts never occur in the training scenes."""

    eval_questions_per_type: int = 100
    """Held-out questions per question type (fewer if the held-out scenes cannot supply that many)."""

    align_mixed_orders: bool = False
    """Draw stage-1 captions from all four `CAPTION_FORMS` word orders, as the LM text is, instead of the first only.

    Off by default: on, stage 2 learns the look-ups by shape and position in every run but existence in none
    (49-61 %); off, each in 2 of 3 runs (existence 85, 84; 54), with verdict-first existence answers ("No,
    there is no red square."; heads of 64). The default's answers (colors of the asked shape first, verdict
    last) are measured with it off. `docs/benchmarks.md` has the runs.
    """

    text_only_fraction: float = 0.05
    """Share of stage-2 records that are text-only (no image), as in LLaVA's mixed instruction data."""

    exist_reading_fraction: float = 0.25
    """Share of stage-2 records that state a scene in words and ask existence questions about it (text only).

    See `dialogues.exist_reading_records`: practice of the existence verdict's comparison without an image. At
    0.25 the verdict follows the colors the model names in every answer (existence 92 and 88 in batch orders 2
    and 42); at 0.12 it goes against them in one run of four (32 of 100 answers, existence 68), and without
    these records (0) in 29-37 answers of every run (existence 61 and 71; `docs/benchmarks.md`).
    """

    position_contrast: bool = True
    """Add to each stage-2 conversation the position questions of all objects that share a shape.

    See `dialogues.same_shape_position_qas`: without them stage 2 found objects for "Where is the {color}
    {shape}?" by their shape and answered about half of the held-out questions whose shape occurs twice with
    the other object's slot (position 77 and 79 %); with them, 93 and 97 %.
    """

    detail_fraction: float = 0.3
    """Probability that a training scene also gets a detailed-description record in stage 2."""

    complex_fraction: float = 0.6
    """Probability that a training scene also gets a complex-reasoning record in stage 2."""

    conversation_turns: int = 4
    """Question/answer turns in each stage-2 conversation record (fewer if the scene offers fewer questions)."""

    samples_per_shard: int = 2000
    """Samples per WebDataset shard written by the converter."""

    tokenizer_vocab_size: int = 640
    """Sentencepiece vocabulary (incl. 256 byte-fallback pieces and <unk>/<s>/</s>); an upper bound."""

    clip_hidden_size: int = 96
    """Width of both CLIP towers."""

    clip_layers: int = 4
    """Depth of the CLIP vision tower (the text tower uses half, at least 1)."""

    clip_heads: int = 4
    """Attention heads of both CLIP towers."""

    clip_steps: int = 600
    """Contrastive pretraining steps of the tiny CLIP."""

    clip_batch_size: int = 128
    """Image-caption pairs per contrastive step (the in-batch negatives)."""

    clip_region_weight: float = 3.0
    """Weight of the region-phrase loss (each object's patch token vs. the phrase naming it); 0 = CLIP loss only."""

    clip_lr: float = 2e-3
    """Peak AdamW learning rate of the CLIP pretraining (cosine decay after a short warm-up)."""

    llm_hidden_size: int = 128
    """Width of the tiny LLaMA."""

    llm_layers: int = 4
    """Decoder layers of the tiny LLaMA."""

    llm_heads: int = 4
    """Attention heads (and key/value heads) of the tiny LLaMA."""

    llm_head_dim: int | None = 64
    """Width of each attention head; None = llm_hidden_size / llm_heads (LLaMA's usual split, 32 here).

    Heads of 64 (attention 256 wide in a 128-wide model, 1.3x the cost of a stage-2 step) learn existence ("Is
    there a red square?") in 2 of 3 runs (85, 84; 54), heads of 32 in none (51 on the same world and stage 1),
    with verdict-first existence answers ("No, there is no red square.").
    """

    llm_max_positions: int = 512
    """Context length of the tiny LLaMA (image tokens + text must fit in it)."""

    llm_steps: int = 400
    """Causal-LM pretraining steps of the tiny LLaMA."""

    llm_batch_size: int = 32
    """Packed sequences per LM step."""

    llm_block_size: int = 128
    """Tokens per packed LM training sequence."""

    llm_lr: float = 2e-3
    """Peak AdamW learning rate of the LM pretraining (cosine decay after a short warm-up)."""

    torch_threads: int = 2
    """CPU threads for backbone pretraining."""

    pretrain_bf16: bool | None = None
    """Pretrain both backbones under bf16 autocast (fp32 master weights); False = fp32; None = bf16 where the CPU
    computes it natively (AMX or AVX512-BF16) and fp32 elsewhere, where bf16 is emulated and far slower
    (`llava_lit.cpu_bf16`). Eager attention either way: SDPA's bf16 backward on the CPU is slower than fp32.
    """

    @property
    def pretrain_in_bf16(self) -> bool:
        """Whether this build pretrains in bf16: `pretrain_bf16`, or this CPU's native bf16 when it is None."""
        return has_native_bf16() if self.pretrain_bf16 is None else self.pretrain_bf16

    @classmethod
    def ci(cls, **overrides: object) -> WorldConfig:
        """The same world in miniature for tests and CI: builds in well under a minute on 2 cores."""
        small = dict(
            n_train_scenes=400,
            n_val_scenes=40,
            n_eval_scenes=60,
            eval_questions_per_type=12,
            clip_hidden_size=64,
            clip_layers=2,
            clip_steps=40,
            clip_batch_size=64,
            llm_hidden_size=64,
            llm_layers=2,
            llm_head_dim=None,
            llm_steps=40,
            llm_batch_size=16,
            samples_per_shard=300,
        )
        small.update(overrides)
        return cls(**small)  # type: ignore[arg-type]

    @classmethod
    def highres(cls, **overrides: object) -> WorldConfig:
        """The high-resolution variant: scenes drawn at three times the tower's input (252 px), shapes a third of
        the default fraction of the width (3.7-5 %: 3-4 px once downscaled to one 84-px view, 9-13 px in an
        84-px AnyRes tile, the default world's object size) and up to five objects; backbones from a built
        default world (`backbones_from`). The slot centres (0.2, 0.5, 0.8 of the side) fall inside the tiles
        of a 3x3 grid, so no object is cut by a tile border."""
        values: dict[str, object] = dict(
            render_scale=3, shape_sizes={"small": 0.037, "large": 0.05}, max_objects=5
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def preset(cls, name: str = "default", **overrides: object) -> WorldConfig:
        """`default` (the full world), `ci` (the miniature one) or `highres` (high-resolution scenes), with field
        overrides applied on top."""
        if name == "default":
            return cls(**overrides)  # type: ignore[arg-type]
        if name == "ci":
            return cls.ci(**overrides)
        if name == "highres":
            return cls.highres(**overrides)
        raise ValueError(f"unknown world preset {name!r}: use 'default', 'ci' or 'highres'")

    @property
    def render_size(self) -> int:
        """Side of the rendered scene images in pixels."""
        return self.image_size * self.render_scale

    @property
    def patch_grid(self) -> int:
        """Patches per side of the CLIP tower's grid (7 for 84 px with 12 px patches)."""
        return self.image_size // self.patch_size

    @property
    def llm_attention_head_dim(self) -> int:
        """Width of each of the tiny LLaMA's attention heads: `llm_head_dim`, or hidden size / heads if unset."""
        return self.llm_head_dim or self.llm_hidden_size // self.llm_heads

    @property
    def num_image_tokens(self) -> int:
        """Patch tokens the CLIP tower yields per image (CLS excluded), i.e. what one `<image>` expands to."""
        return self.patch_grid**2

    def validate(self) -> None:
        """Raise `ValueError` for settings that cannot produce a sensible world."""
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not 1 <= self.max_objects <= 5:
            raise ValueError(f"max_objects must be in 1..5 (one per position slot), got {self.max_objects}")
        if len(self.palette) < self.max_objects:
            raise ValueError(
                "the palette needs at least max_objects colors (colors are distinct within a scene)"
            )
        unknown = set(self.shapes) - {"circle", "square", "triangle"}
        if unknown:
            raise ValueError(f"no renderer for shapes {sorted(unknown)}")
        clash = set(self.palette) & set(self.backgrounds)
        if clash:
            raise ValueError(f"names used both as object and background colors: {sorted(clash)}")
        if self.render_scale < 1:
            raise ValueError(f"render_scale must be >= 1, got {self.render_scale}")
        if self.render_scale > 1 and not self.backbones_from:
            raise ValueError(
                "a world drawn above the tower's resolution (render_scale > 1) reuses the backbones of a world "
                "drawn at it: set backbones_from to a built world's folder (`python -m llava_lit.world` builds "
                "the default one)"
            )
        smallest = 0.05 / self.render_scale
        for name, frac in self.shape_sizes.items():
            if not smallest <= frac <= 0.25:
                raise ValueError(f"shape size {name}={frac} outside {smallest:.3g}..0.25 of the image width")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the config, the pretraining precision it resolves to here and the build format: a cached world
        is reused only if this matches."""
        fields = self.to_dict()
        for name, default in UNHASHED_DEFAULTS.items():  # settings that left earlier worlds unchanged
            if fields[name] == default:
                del fields[name]
        payload = {"v": WORLD_FORMAT_VERSION, "cfg": fields, "bf16": self.pretrain_in_bf16}
        if self.backbones_from:  # a rebuilt source world means other backbones, so another world
            source = Path(self.backbones_from).expanduser() / "world.json"
            payload["backbones"] = (
                json.loads(source.read_text()).get("fingerprint") if source.is_file() else None
            )
        payload = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
