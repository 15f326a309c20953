"""Batched prediction: the official answer file, resuming, broken images, and the in-training entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_lit.predict import generate_answers, predict
from llava_lit.qa_files import read_answers, read_questions

ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_predict_writes_resumes_and_reports_broken_images(tiny_checkpoint, question_set, tmp_path):
    questions, images = question_set
    answers = tmp_path / "out" / "answers.jsonl"
    predict(
        questions,
        images,
        answers,
        checkpoint=tiny_checkpoint,
        batch_size=4,
        max_new_tokens=6,
        accelerator="cpu",
    )
    rows = _lines(answers)
    assert len(rows) == 6 and all(set(r) == ANSWER_KEYS for r in rows)
    # Each answer carries its question's id as the question file wrote it: integers stay integers (the
    # official VQAv2/MMBench submission converters match them by value and type).
    assert {r["question_id"] for r in rows} == {0, 1, "q2", 3, 4, 5}
    by_id = {str(r["question_id"]): r for r in rows}
    assert by_id["3"]["text"] == "" and "image_undecodable" in by_id["3"]["metadata"]["error"]
    assert by_id["4"]["text"] == "" and "image_missing" in by_id["4"]["metadata"]["error"]
    for qid in ("0", "1", "q2", "5"):
        assert by_id[qid]["text"] and "error" not in by_id[qid]["metadata"]
        assert by_id[qid]["metadata"]["completion_tokens"] <= 6
    assert by_id["q2"]["prompt"] == "What is two plus two?"
    assert {r["model_id"] for r in rows} == {"tiny/finetune"}
    assert len(read_answers(answers)) == 6

    # Nothing left to do: a re-run appends nothing.
    predict(questions, images, answers, checkpoint=tiny_checkpoint, batch_size=4, max_new_tokens=6)
    assert _lines(answers) == rows

    # An interrupted run (last two answers lost, a half-written line) resumes with just those questions, and
    # batch size does not change greedy answers.
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + '{"question_id": "5", "te')
    predict(
        questions,
        images,
        answers,
        checkpoint=tiny_checkpoint,
        batch_size=1,
        max_new_tokens=6,
        accelerator="cpu",
    )
    resumed = {str(r["question_id"]): r["text"] for r in _lines_skipping_bad(answers)}
    assert resumed == {qid: r["text"] for qid, r in by_id.items()}


def _lines_skipping_bad(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_generate_answers_from_a_module_in_training_mode(tiny_bundle, question_set):
    from torch import nn

    questions_file, images = question_set
    questions = read_questions(questions_file)

    class Holder(nn.Module):  # what the eval callback sees: `.model` and `.run_config`, as on LlavaLitModule
        def __init__(self):
            super().__init__()
            self.model = tiny_bundle.model
            self.run_config = tiny_bundle.run_config

    holder = Holder()
    holder.model.train()
    answers = generate_answers(holder, questions, str(images), batch_size=3, max_new_tokens=5)
    assert holder.model.training
    holder.model.eval()
    assert len(answers) == len(questions)
    assert answers[3] == "" and answers[4] == ""
    assert all(answers[i] for i in (0, 1, 2, 5))


@pytest.mark.slow
def test_predict_command_line(tiny_checkpoint, question_set, tmp_path):
    questions, images = question_set
    answers = tmp_path / "cli_answers.jsonl"
    env = {**os.environ, "LLAVA_LIT_OUTPUTS": str(tmp_path / "outputs")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_lit.predict",
            f"checkpoint={tiny_checkpoint}",
            f"questions_file={questions}",
            f"image_folder={images}",
            f"answers_file={answers}",
            "batch_size=6",
            "max_new_tokens=4",
            "accelerator=cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_lines(answers)) == 6
