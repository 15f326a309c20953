"""Small hand-checked benchmark folders in the official layouts, written per test into tmp_path.

Every expected number in the tests is counted by hand from these fixtures; the comments next to each
fixture say which answers are right.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image


def _png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), color).save(path)


SQA_PROBLEMS = {
    # pid: (subject, hint, has image, grade, n choices, answer index)
    "1": ("natural science", "", True, "grade4", 4, 0),  # NAT IMG G1-6
    "2": ("natural science", "Look at the table.", False, "grade8", 2, 1),  # NAT TXT G7-12
    "3": ("social science", "", False, "grade3", 3, 2),  # SOC NO G1-6
    "4": ("social science", "Read the map.", True, "grade10", 3, 1),  # SOC TXT IMG G7-12
    "5": ("language science", "", False, "grade2", 2, 0),  # LAN NO G1-6
    "6": ("language science", "", True, "grade12", 5, 4),  # LAN IMG G7-12
    "7": ("natural science", "", False, "grade5", 2, 1),  # train split: never scored
}


@pytest.fixture
def scienceqa_dir(tmp_path: Path) -> Path:
    """`problems.json`, `pid_splits.json`, `llava_test_CQM-A.json` and `images/test/<pid>/image.png`."""
    root = tmp_path / "scienceqa"
    problems = {}
    for pid, (subject, hint, has_image, grade, n, answer) in SQA_PROBLEMS.items():
        problems[pid] = {
            "question": f"Question {pid}?",
            "choices": [f"choice {pid}{c}" for c in "abcde"[:n]],
            "answer": answer,
            "hint": hint,
            "image": "image.png" if has_image else None,
            "task": "closed choice",
            "grade": grade,
            "subject": subject,
            "topic": "t",
            "category": "c",
            "skill": "s",
            "lecture": "",
            "solution": "",
            "split": "train" if pid == "7" else "test",
        }
        if has_image:
            _png(root / "images" / "test" / pid / "image.png", (int(pid) * 30, 80, 120))
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems, indent=1))
    (root / "pid_splits.json").write_text(
        json.dumps({"train": ["7"], "val": [], "test": ["1", "2", "3", "4", "5", "6"]})
    )
    # LLaVA-1.5's question layout: first human turn holds `<image>\n` (image problems), an optional
    # "Context:" line, the question and `A. ...` options; the gpt turn holds the letter.
    records = []
    for pid, p in problems.items():
        if pid == "7":
            continue
        lines = ([f"Context: {p['hint']}"] if p["hint"] else []) + [p["question"]]
        lines += [f"{letter}. {c}" for letter, c in zip("ABCDE", p["choices"], strict=False)]
        value = "\n".join(lines)
        record = {
            "id": pid,
            "conversations": [
                {"from": "human", "value": value},
                {"from": "gpt", "value": "ABCDE"[p["answer"]]},
            ],
        }
        if p["image"]:
            record["conversations"][0]["value"] = "<image>\n" + value
            record["image"] = f"{pid}/image.png"
        records.append(record)
    (root / "llava_test_CQM-A.json").write_text(json.dumps(records, indent=1))
    return root


def _write_answers(path: Path, answers: dict[str, str]) -> Path:
    with path.open("w") as f:
        for i, (qid, text) in enumerate(answers.items()):
            row = {
                "question_id": qid,
                "prompt": "",
                "text": text,
                "answer_id": f"a{i}",
                "model_id": "m",
                "metadata": {},
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def write_answers():
    """`write_answers(path, {qid: text})` writes an official answer JSONL (`question_id`, `prompt`, `text`,
    `answer_id`, `model_id`, `metadata`) and returns its path."""
    return _write_answers


@pytest.fixture
def pope_dir(tmp_path: Path) -> Path:
    """`coco_pope_{random,popular,adversarial}.json` (JSON lines, ids 1..4 reused across splits)."""
    root = tmp_path / "pope"
    root.mkdir()
    labels = {
        "random": ["yes", "no", "yes", "no"],
        "popular": ["yes", "yes", "no", "no"],
        "adversarial": ["no", "no", "yes", "yes"],
    }
    for split, labs in labels.items():
        with (root / f"coco_pope_{split}.json").open("w") as f:
            for i, lab in enumerate(labs, start=1):
                row = {
                    "question_id": i,
                    "image": f"COCO_val2014_{i:012d}.jpg",
                    "text": f"Is there a dog{i} in the image?",
                    "label": lab,
                }
                f.write(json.dumps(row) + "\n")
    return root


@pytest.fixture
def mme_dir(tmp_path: Path) -> Path:
    """An MME release folder: `existence` (txt beside images), `artwork` (images/ + questions_answers_YN/),
    `code_reasoning` (cognition); two images each, two questions per image (one Yes, one No)."""
    root = tmp_path / "MME_Benchmark_release_version"
    for sub, split_layout in (("existence", False), ("artwork", True), ("code_reasoning", False)):
        for k, stem in enumerate(("0001", "0002")):
            image_dir = root / sub / "images" if split_layout else root / sub
            qa_dir = root / sub / "questions_answers_YN" if split_layout else root / sub
            suffix = ".jpg" if split_layout else ".png"
            _png(image_dir / f"{stem}{suffix}", (40 * k, 100, 200))
            qa_dir.mkdir(parents=True, exist_ok=True)
            (qa_dir / f"{stem}.txt").write_text(
                f"Is there a thing {stem} in this image? Please answer yes or no.\tYes\n"
                f"Is there no thing {stem} in this image? Please answer yes or no.\tNo\n"
            )
    return root
