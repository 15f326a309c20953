"""The miniature world's trained model exports and answers the same held-out questions through transformers as
through llava_lit.

The finetuned CI world checkpoint is exported with `python -m llava_lit.export` (which also verifies logits), then
held-out questions of every type are answered greedily twice: by transformers alone (`LlavaForConditionalGeneration`
+ `AutoProcessor.apply_chat_template`, nothing of llava_lit involved) and by `llava_lit.predict` from the checkpoint
and from the exported folder. All three must give the same answers.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_lit.export import main as export_main
from llava_lit.hydra_app import compose_config
from llava_lit.predict import predict

N_QUESTIONS = 20
MAX_NEW_TOKENS = 32


def held_out_subset(questions_file: Path, n: int, out: Path) -> list[dict]:
    """`n` held-out questions taken round-robin over the question types, written as a question file."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for line in questions_file.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_type[row.get("category", "")].append(row)
    chosen: list[dict] = []
    while len(chosen) < n and any(by_type.values()):
        for rows in by_type.values():
            if rows and len(chosen) < n:
                chosen.append(rows.pop(0))
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return chosen


def transformers_answers(folder: Path, questions: list[dict], images: Path) -> dict[str, str]:
    """Greedy answers through transformers' own LLaVA classes, one question at a time."""
    model = LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    answers = {}
    for q in questions:
        content = [{"type": "text", "text": q["text"]}]
        image = None
        if q.get("image"):
            content.insert(0, {"type": "image"})
            image = Image.open(images / q["image"]).convert("RGB")
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        answers[str(q["question_id"])] = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    return answers


def _answers(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["question_id"]): r["text"] for r in rows}


@pytest.mark.slow
def test_world_model_answers_alike_through_transformers(
    trained_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAVA_LIT_CACHE", str(tmp_path / "cache"))  # configs of the imported export
    world = trained_world["world"]
    exported = export_main(
        compose_config("export", [f"checkpoint={trained_world['finetune']}", f"out={tmp_path / 'hf'}"])
    )

    questions_file = tmp_path / "questions.jsonl"
    questions = held_out_subset(world / "eval" / "questions.jsonl", N_QUESTIONS, questions_file)
    assert len(questions) == N_QUESTIONS and len({q.get("category") for q in questions}) > 1
    images = world / "eval" / "images"

    theirs = transformers_answers(exported, questions, images)
    settings = {"batch_size": 8, "max_new_tokens": MAX_NEW_TOKENS, "accelerator": "cpu"}
    ours = _answers(
        predict(
            questions_file,
            images,
            tmp_path / "ckpt.jsonl",
            checkpoint=trained_world["finetune"],
            **settings,
        )
    )
    via_export = _answers(
        predict(questions_file, images, tmp_path / "hf.jsonl", checkpoint=exported, **settings)
    )

    assert len(ours) == N_QUESTIONS and all(ours.values())
    assert len(set(ours.values())) > 1, "a trained model answers different questions differently"
    assert theirs == ours
    assert via_export == ours
