"""MME: the official yes/no reading, acc / acc+ per subtask, perception and cognition totals, both input layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_lit.eval.mme import MMEBenchmark, parse_yes_no, read_llava_results, score_records


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"),
        ("NO", "no"),
        ("Yes, it is.", "yes"),
        ("No, there is not.", "no"),
        ("Not at all", "no"),  # "no" within the first four characters
        ("The answer is yes", "other"),  # only the first four characters are read
        ("nyes", "yes"),  # "yes" is checked before "no"
        ("", "other"),
    ],
)
def test_parse_yes_no_official_rule(text: str, label: str) -> None:
    assert parse_yes_no(text) == label


ANSWERS = {
    "existence/0001.png/0": "Yes",  # gt yes: right
    "existence/0001.png/1": "No, there is not.",  # gt no: right -> image 0001 fully right
    "existence/0002.png/0": "yes",  # right
    "existence/0002.png/1": "Yes",  # gt no: wrong
    "artwork/0001.jpg/0": "The image shows yes",  # other: wrong
    "artwork/0001.jpg/1": "no",  # right
    "artwork/0002.jpg/0": "Yes",  # right; artwork/0002.jpg/1 unanswered: wrong
    "code_reasoning/0001.png/0": "Yes",
    "code_reasoning/0001.png/1": "No",
    "code_reasoning/0002.png/0": "Yes",
    "code_reasoning/0002.png/1": "No",
}


def test_questions_cover_both_release_layouts(mme_dir: Path) -> None:
    qs = MMEBenchmark(root=str(mme_dir)).questions()
    assert len(qs) == 12
    by_id = {q.question_id: q for q in qs}
    assert by_id["artwork/0001.jpg/0"].image == "artwork/images/0001.jpg"
    assert by_id["existence/0002.png/1"].image == "existence/0002.png"
    assert (mme_dir / by_id["artwork/0001.jpg/0"].image).is_file()
    assert by_id["existence/0001.png/0"].text == (
        "Is there a thing 0001 in this image? Please answer yes or no.\n"
        "Answer the question using a single word or phrase."
    )
    assert [q.category for q in qs][:4] == ["existence"] * 4  # official subtask order


def test_score_hand_counted(mme_dir: Path) -> None:
    m = MMEBenchmark(root=str(mme_dir)).score(ANSWERS)
    assert m["existence"] | {} == {
        "acc": 75.0,
        "acc_plus": 50.0,
        "score": 125.0,
        "n": 4,
        "images": 2,
        "other": 0,
        "missing": 0,
    }
    assert (m["artwork"]["acc"], m["artwork"]["acc_plus"], m["artwork"]["score"]) == (50.0, 0.0, 50.0)
    assert (m["artwork"]["other"], m["artwork"]["missing"]) == (2, 1)
    assert m["code_reasoning"]["score"] == 200.0
    assert m["perception"] == {"score": 175.0, "subtasks": 2}
    assert m["cognition"] == {"score": 200.0, "subtasks": 1}


def test_llava_converted_results_score_the_same(mme_dir: Path, tmp_path: Path) -> None:
    """LLaVA's convert_answer_to_mme.py layout: `<subtask>.txt` lines `image\\tquestion\\tgt\\tprediction`."""
    bench = MMEBenchmark(root=str(mme_dir))
    results = tmp_path / "answers"
    results.mkdir()
    lines: dict[str, list[str]] = {}
    for q in bench.questions():
        sub, image, k = q.question_id.split("/")
        question = q.text.split("\n")[0]
        gt = "Yes" if k == "0" else "No"
        pred = ANSWERS.get(q.question_id, "")
        lines.setdefault(sub, []).append("\t".join([image, question, gt, pred]))
    for sub, rows in lines.items():
        (results / f"{sub}.txt").write_text("\n".join(rows) + "\n")
    from_files = score_records(read_llava_results(results))
    from_answers = bench.score(ANSWERS)
    for row in ("existence", "artwork", "code_reasoning", "perception", "cognition"):
        for key in ("acc", "acc_plus", "score"):
            assert from_files[row].get(key) == from_answers[row].get(key), (row, key)


def test_bad_ground_truth_is_a_clear_error(mme_dir: Path) -> None:
    (mme_dir / "existence" / "0001.txt").write_text("Is it? Please answer yes or no.\tMaybe\n")
    with pytest.raises(ValueError, match="Yes or No"):
        MMEBenchmark(root=str(mme_dir))
