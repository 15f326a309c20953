"""POPE: LLaVA's first-sentence yes/no rule and hand-counted per-split metrics on official label files."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_lit.eval.pope import PopeBenchmark, parse_yes


@pytest.mark.parametrize(
    ("text", "yes"),
    [
        ("Yes", True),
        ("No", False),
        ("no", False),
        ("There is not a dog.", False),
        ("Yes. There is no cat though.", True),  # only the first sentence counts
        ("yes, no doubt", False),  # commas dropped: "no" is a word of the first sentence
        ("Not sure.", True),  # "Not" is not in LLaVA's list: read as yes
        ("NO", True),  # case matters in LLaVA's rule
        ("I don't know", True),
        ("", True),
    ],
)
def test_parse_yes_follows_llava(text: str, yes: bool) -> None:
    assert parse_yes(text) is yes


def test_questions_have_split_prefixed_unique_ids(pope_dir: Path) -> None:
    qs = PopeBenchmark(annotation_dir=str(pope_dir), image_folder="unused").questions()
    assert len(qs) == 12 and len({q.question_id for q in qs}) == 12
    assert qs[0].question_id == "random/1" and qs[0].category == "random"
    assert qs[0].text == "Is there a dog1 in the image?\nAnswer the question using a single word or phrase."
    assert qs[0].image == "COCO_val2014_000000000001.jpg"


def test_metrics_per_split_hand_counted(pope_dir: Path) -> None:
    answers = {
        # random, labels yes/no/yes/no -> TP, TN, FN, FP
        "random/1": "Yes, there is a dog.",
        "random/2": "No.",
        "random/3": "There is not a dog in the image.",
        "random/4": "Not sure.",
        # popular, labels yes/yes/no/no -> TP, FN, TN, (4 unanswered)
        "popular/1": "Yes. But there is no cat.",
        "popular/2": "yes, no doubt",
        "popular/3": "No, there isn't",
        # adversarial, labels no/no/yes/yes, all answered yes -> FP, FP, TP, TP
        **{f"adversarial/{i}": "Yes" for i in range(1, 5)},
    }
    m = PopeBenchmark(annotation_dir=str(pope_dir), image_folder="unused").score(answers)
    r = m["random"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 1, 1)
    assert r["acc"] == r["precision"] == r["recall"] == r["f1"] == r["yes_ratio"] == 50.0
    p = m["popular"]
    assert (p["tp"], p["fp"], p["tn"], p["fn"], p["missing"]) == (1, 0, 1, 1, 1)
    assert p["acc"] == 50.0 and p["precision"] == 100.0 and p["recall"] == 50.0
    assert p["f1"] == pytest.approx(200 / 3) and p["yes_ratio"] == pytest.approx(100 / 3)
    a = m["adversarial"]
    assert (a["acc"], a["precision"], a["recall"], a["yes_ratio"]) == (50.0, 50.0, 100.0, 100.0)
    assert m["mean"]["f1"] == pytest.approx((50 + 200 / 3 + 200 / 3) / 3)
    assert m["mean"]["n"] == 12


def test_all_no_answers_give_zero_f1_not_a_crash(pope_dir: Path) -> None:
    bench = PopeBenchmark(annotation_dir=str(pope_dir), image_folder="unused", splits=["random"])
    m = bench.score({f"random/{i}": "No" for i in range(1, 5)})["random"]
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] is None and m["acc"] == 50.0


def test_missing_split_file_and_bad_label_are_clear_errors(pope_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="coco_pope_gqa"):
        PopeBenchmark(annotation_dir=str(pope_dir), image_folder="x", splits=["gqa"])
    (pope_dir / "coco_pope_random.json").write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "q", "label": "maybe"}\n'
    )
    with pytest.raises(ValueError, match="coco_pope_random.json:1"):
        PopeBenchmark(annotation_dir=str(pope_dir), image_folder="x")
