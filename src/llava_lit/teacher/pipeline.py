"""Run the teacher over many images: prompts → chat endpoint → strict parsing → LLaVA-format records.

Each (image, data type) is one job. Its cache key holds the image, the type, the prompt version, the model,
a hash of the exact user turn and the attempt number, so a stopped run resumes with no repeated paid call
and editing a prompt or an annotation re-asks only what changed. A reply that fails parsing is asked again
(a new attempt, a new key) up to `max_reply_attempts` times, then rejected and counted. Output: one LLaVA JSON
list per type, the mixed list, and `summary.json` with generated / rejected / failed counts and usage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.openai_client import BudgetExhausted, ChatClient, ChatClientConfig, ChatRequestError
from llava_lit.teacher.annotations import ImageAnnotation, format_context
from llava_lit.teacher.prompts import DATA_TYPES, PromptSet, load_prompt_sets
from llava_lit.teacher.replies import DEFAULT_BANNED_WORDS, RejectedReply, parse_reply

log = logging.getLogger(__name__)

MIXED_FILE = "llava_instruct_mixed.json"


@dataclass
class TeacherConfig:
    """What to generate and how strictly to accept it."""

    types: list[str] = field(default_factory=lambda: list(DATA_TYPES))
    """Data types to generate for every image (subset of conversation, detail_description, complex_reasoning)."""
    prompts_dir: str | None = None
    """Folder with one prompt folder per type; None uses the prompts shipped in `llava_lit/teacher/prompts`."""
    boxes_for: list[str] = field(default_factory=lambda: ["detail_description", "complex_reasoning"])
    """Types whose user turn lists the boxes as well as the captions (the paper's conversations use captions only)."""
    max_reply_attempts: int = 2
    """Times a type is asked for one image before an unusable reply is rejected for good."""
    banned_words: list[str] = field(default_factory=lambda: list(DEFAULT_BANNED_WORDS))
    """Replies mentioning any of these (word prefix, any case) are rejected: they talk about the inputs."""


@dataclass
class _Outcome:
    data_type: str
    index: int
    record: dict[str, Any] | None = None
    rejected: str | None = None
    failed: str | None = None


def build_record(
    annotation: ImageAnnotation, data_type: str, turns: list[tuple[str, str]], prompts: PromptSet
) -> dict:
    """A LLaVA-format record with `<image>` opening the first human turn."""
    if data_type == "detail_description":
        # Stable per image, so a re-run writes the same record.
        pick = int(hashlib.sha256(annotation.image_id.encode()).hexdigest(), 16) % len(prompts.instructions)
        turns = [(prompts.instructions[pick], turns[0][1])]
    conversations = []
    for i, (question, answer) in enumerate(turns):
        value = f"{IMAGE_TOKEN}\n{question}" if i == 0 else question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {
        "id": f"{annotation.image_id}_{data_type}",
        "image": annotation.image,
        "conversations": conversations,
    }


def cache_key(
    annotation: ImageAnnotation, data_type: str, prompts: PromptSet, model: str, context: str, attempt: int
) -> str:
    context_hash = hashlib.sha256(context.encode()).hexdigest()[:12]
    return f"teacher|{model}|{data_type}|{prompts.version}|{annotation.image}|{context_hash}|try{attempt}"


async def _run_job(
    client: ChatClient,
    annotation: ImageAnnotation,
    index: int,
    data_type: str,
    prompts: PromptSet,
    cfg: TeacherConfig,
) -> _Outcome:
    context = format_context(annotation, include_boxes=data_type in cfg.boxes_for)
    messages = prompts.messages(context)
    reason = "no_attempt"
    for attempt in range(max(1, cfg.max_reply_attempts)):
        key = cache_key(annotation, data_type, prompts, client.config.model, context, attempt)
        try:
            reply = await client.complete(key, messages)
        except BudgetExhausted:
            return _Outcome(data_type, index, failed="budget_exhausted")
        except ChatRequestError as err:
            log.warning("%s %s: request failed: %s", annotation.image, data_type, err)
            return _Outcome(data_type, index, failed="request_failed")
        try:
            turns = parse_reply(data_type, reply.text, reply.finish_reason, cfg.banned_words)
        except RejectedReply as err:
            reason = err.reason
            log.info("%s %s attempt %d rejected: %s", annotation.image, data_type, attempt, err)
            continue
        return _Outcome(data_type, index, record=build_record(annotation, data_type, turns, prompts))
    return _Outcome(data_type, index, rejected=reason)


async def generate_async(
    annotations: list[ImageAnnotation],
    cfg: TeacherConfig,
    client_config: ChatClientConfig,
    output_dir: str | Path,
) -> dict[str, Any]:
    """Generate every (image, type) job, write the output files and return the summary (also `summary.json`)."""
    unknown = sorted(set(cfg.types) - set(DATA_TYPES))
    if unknown:
        raise ValueError(f"unknown data types {unknown}; choose from {list(DATA_TYPES)}")
    prompt_sets = load_prompt_sets(cfg.prompts_dir, cfg.types)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[_Outcome] = []
    async with ChatClient(client_config) as client:
        jobs = [
            _run_job(client, ann, i, t, prompt_sets[t], cfg)
            for i, ann in enumerate(annotations)
            for t in cfg.types
        ]
        for next_done in tqdm(asyncio.as_completed(jobs), total=len(jobs), desc="teacher", unit="reply"):
            outcomes.append(await next_done)
        usage = client.usage.summary()
    outcomes.sort(key=lambda o: (o.index, cfg.types.index(o.data_type)))
    summary: dict[str, Any] = {"images": len(annotations), "types": {}, "usage": usage}
    mixed = []
    for t in cfg.types:
        mine = [o for o in outcomes if o.data_type == t]
        records = [o.record for o in mine if o.record is not None]
        _write_json(output_dir / f"{t}.json", records)
        summary["types"][t] = {
            "generated": len(records),
            "rejected": dict(Counter(o.rejected for o in mine if o.rejected)),
            "failed": dict(Counter(o.failed for o in mine if o.failed)),
            "prompt_version": prompt_sets[t].version,
        }
    mixed = [o.record for o in outcomes if o.record is not None]
    _write_json(output_dir / MIXED_FILE, mixed)
    summary["generated"] = len(mixed)
    summary["complete"] = all(not s["failed"] for s in summary["types"].values())
    _write_json(output_dir / "summary.json", summary)
    return summary


def generate(
    annotations: list[ImageAnnotation],
    cfg: TeacherConfig,
    client_config: ChatClientConfig,
    output_dir: str | Path,
) -> dict[str, Any]:
    """Synchronous `generate_async` for scripts and tests."""
    return asyncio.run(generate_async(annotations, cfg, client_config, output_dir))


def _write_json(path: Path, obj: Any) -> None:
    # Write-then-rename: an interrupted run never leaves a truncated output file behind.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
