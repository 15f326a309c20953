"""Open-ended VQA: the EvalAI-style normaliser, soft accuracy, and scoring of the official VQAv2/TextVQA/GQA files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_lit.eval.vqa import VQABenchmark, normalize_answer, soft_accuracy


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two dogs.", "2 dogs"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("none", "0"),
        ("ten", "10"),
        ("dont", "don't"),
        ("Couldntve", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("its", "its"),  # an ordinary word, not "it's"
        ("1,000", "1000"),  # digit-comma-digit: punctuation removed outright
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes.", "yes"),
        ("red/white", "red white"),  # punctuation inside a word becomes a space
        ("red / white", "red white"),  # punctuation touching a space is dropped
        ("man's hat", "man 's hat"),
        ("  Left\n", "left"),
    ],
)
def test_normalize_answer(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_soft_accuracy_leave_one_out() -> None:
    gts = ["2"] * 3 + ["3"] * 7
    # "two" matches the three "2"s: leaving one of them out leaves 2 matches (2/3), otherwise 3 (1).
    assert soft_accuracy("two", gts) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert soft_accuracy("3", gts) == 1.0
    assert soft_accuracy("4", gts) == 0.0
    assert soft_accuracy("Red.", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        soft_accuracy("x", [])


def test_textvqa_file(tmp_path: Path) -> None:
    data = {
        "dataset_name": "textvqa",
        "dataset_type": "val",
        "dataset_version": "0.5.1",
        "data": [
            {"question": "what brand?", "image_id": "abc", "question_id": 34602, "answers": ["nokia"] * 10, "set_name": "val"},
            {"question": "what number?", "image_id": "def", "question_id": 34603, "answers": ["5"] * 2 + ["6"] * 8, "set_name": "val"},
            {"question": "what word?", "image_id": "ghi", "question_id": 34604, "answers": ["stop"] * 10, "set_name": "val"},
        ],
    }  # fmt: skip
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps(data))
    bench = VQABenchmark(format="textvqa", question_file=str(path), image_folder="unused")
    qs = bench.questions()
    assert qs[0].question_id == "34602" and qs[0].image == "abc.jpg"
    assert qs[0].text == "what brand?\nAnswer the question using a single word or phrase."
    # 34602 right (1.0); 34603 "five" matches the two "5"s: 8 x 2/3 + 2 x 1/3 over 10 = 0.6; 34604 unanswered.
    m = bench.score({"34602": "Nokia.", "34603": "five"})
    assert m["overall"]["soft_acc"] == pytest.approx(100 * (1.0 + 0.6) / 3)
    assert m["overall"]["exact_match"] == pytest.approx(100 / 3)  # majority of 34603 is "6"
    assert m["overall"]["missing"] == 1 and bench.reference("34603") == "6"


def test_vqav2_files_per_answer_type(tmp_path: Path) -> None:
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "Is it sunny?", "question_id": 420},
            {"image_id": 43, "question": "How many cats?", "question_id": 430},
        ],
    }
    annotations = {
        "annotations": [
            {"question_id": 420, "image_id": 42, "answer_type": "yes/no", "question_type": "is it", "multiple_choice_answer": "yes",
             "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]},
            {"question_id": 430, "image_id": 43, "answer_type": "number", "question_type": "how many", "multiple_choice_answer": "2",
             "answers": [{"answer": "2" if i <= 4 else "two cats", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]},
        ]
    }  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    bench = VQABenchmark(
        format="vqav2",
        question_file=str(tmp_path / "q.json"),
        annotation_file=str(tmp_path / "a.json"),
        image_folder="x",
    )
    assert bench.questions()[0].image == "COCO_val2014_000000000042.jpg"
    m = bench.score({"420": "Yes", "430": "Two"})
    # 430: "2" has 4 matches -> every leave-one-out subset has >= 3 -> 1.0; but the majority is "2 cats".
    assert m["yes/no"]["soft_acc"] == 100.0 and m["number"]["soft_acc"] == 100.0
    assert m["number"]["exact_match"] == 0.0 and m["overall"]["exact_match"] == 50.0
    with pytest.raises(ValueError, match="annotation_file|annotations"):
        VQABenchmark(format="vqav2", question_file=str(tmp_path / "q.json"), image_folder="x")


def test_gqa_exact_match_per_structural_type(tmp_path: Path) -> None:
    questions = {
        "201": {"imageId": "n1", "question": "Is the cup red?", "answer": "no", "fullAnswer": "No, it is blue.", "types": {"structural": "verify"}},
        "202": {"imageId": "n2", "question": "What is on the table?", "answer": "laptop", "fullAnswer": "A laptop.", "types": {"structural": "query"}},
    }  # fmt: skip
    (tmp_path / "gqa.json").write_text(json.dumps(questions))
    bench = VQABenchmark(format="gqa", question_file=str(tmp_path / "gqa.json"), image_folder="x")
    m = bench.score({"201": "No.", "202": "a laptop"})  # GQA's LLaVA conversion keeps the article
    assert m["verify"]["exact_match"] == 100.0 and m["query"]["exact_match"] == 0.0
    assert "soft_acc" not in m["overall"] and m["overall"]["exact_match"] == 50.0


def test_unknown_format_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown VQA format"):
        VQABenchmark(format="okvqa", question_file=str(tmp_path / "x.json"), image_folder="x")  # type: ignore[arg-type]
