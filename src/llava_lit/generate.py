"""`python -m llava_lit.generate`: write LLaVA instruction data with a language-only teacher.

Hydra-configured (`conf/generate.yaml`). Reads COCO captions/instances or a JSONL of
`{image, captions[], boxes[{category, bbox}]}`, asks any OpenAI-compatible endpoint for conversations,
detailed descriptions and complex-reasoning answers, and writes LLaVA-format JSON ready for
`python -m llava_lit.convert`. Examples:

    python -m llava_lit.generate input.jsonl=scenes.jsonl output_dir=out/teacher client.model=gpt-4o-mini
    OPENAI_BASE_URL=http://localhost:8000/v1 python -m llava_lit.generate input.jsonl=scenes.jsonl \\
        client.model=Qwen/Qwen2.5-7B-Instruct client.max_requests=1000

Re-running the same command resumes: replies already in `client.cache_path` are not asked again.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llava_lit.hydra_app import hydra_app
from llava_lit.openai_client import ChatClientConfig
from llava_lit.teacher.annotations import ImageAnnotation, load_coco_annotations, load_jsonl_annotations
from llava_lit.teacher.pipeline import TeacherConfig, generate

log = logging.getLogger(__name__)


@dataclass
class InputConfig:
    """Where the captions and boxes come from: a JSONL file, or COCO annotation files."""

    jsonl: str | None = None
    """JSONL of `{image, captions[], boxes[{category, bbox}], width?, height?}` records."""
    coco_captions: str | None = None
    """COCO `captions_*.json`; used when `jsonl` is not given."""
    coco_instances: str | None = None
    """COCO `instances_*.json` with the boxes (optional: without it the teacher sees captions only)."""
    image_prefix: str = ""
    """Prepended to COCO `file_name`s so record paths match the image folder given to the converter."""
    limit: int | None = None
    """Use only the first N images (for a cheap trial run)."""


@dataclass
class GenerateConfig:
    """Everything `python -m llava_lit.generate` needs."""

    input: InputConfig = field(default_factory=InputConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    client: ChatClientConfig = field(default_factory=ChatClientConfig)
    output_dir: str = "outputs/teacher"
    """Folder for `<type>.json`, the mixed file and `summary.json`."""


def load_inputs(cfg: InputConfig) -> tuple[list[ImageAnnotation], Counter]:
    """The annotations named by `cfg`, with the count of skipped input records by reason."""
    if cfg.jsonl:
        annotations, skipped = load_jsonl_annotations(cfg.jsonl)
    elif cfg.coco_captions:
        annotations, skipped = load_coco_annotations(cfg.coco_captions, cfg.coco_instances, cfg.image_prefix)
    else:
        raise ValueError("set input.jsonl, or input.coco_captions (and optionally input.coco_instances)")
    if cfg.limit is not None:
        annotations = annotations[: cfg.limit]
    return annotations, skipped


def run(cfg: GenerateConfig) -> dict:
    """Load inputs, generate, and return the summary (which also lands in `output_dir/summary.json`)."""
    annotations, skipped = load_inputs(cfg.input)
    if not annotations:
        raise ValueError(f"no usable input records (skipped: {dict(skipped)})")
    summary = generate(annotations, cfg.teacher, cfg.client, cfg.output_dir)
    summary["skipped_inputs"] = dict(skipped)
    summary_path = Path(cfg.output_dir) / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


@hydra_app("generate", schemas={"": GenerateConfig})
def main(raw: DictConfig) -> None:
    cfg: GenerateConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GenerateConfig), raw))
    summary = run(cfg)
    print(json.dumps(summary, indent=2))
    if not summary["complete"]:
        log.warning("some jobs failed (see 'failed' above); run the same command again to resume")


if __name__ == "__main__":
    main()
