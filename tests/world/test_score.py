"""The scorer on hand-checked answers: keys must be named exactly, hedging is wrong."""

from __future__ import annotations

import pytest

from llava_lit.world.score import accuracy_by_object_count, format_table, is_correct, score_answers

COLORS = ["blue", "green", "orange", "purple", "red", "yellow"]


def gold(category, key, candidates, qid=0):
    return {"question_id": qid, "category": category, "key": key, "candidates": candidates}


@pytest.mark.parametrize(
    "row, answer, ok",
    [
        (gold("color", "red", COLORS), "The circle is red.", True),
        (gold("color", "red", COLORS), "Red.", True),
        (gold("color", "red", COLORS), "The circle is red or blue.", False),
        (gold("color", "red", COLORS), "The circle is blue.", False),
        (gold("color", "red", COLORS), "", False),
        (gold("shape", "circle", ["circle", "square", "triangle"]), "The red object is a circle.", True),
        (gold("shape", "circle", ["circle", "square", "triangle"]), "circles", True),
        (gold("shape", "circle", ["circle", "square", "triangle"]), "A circle or a square.", False),
        (gold("count", "3", ["1", "2", "3"]), "There are 3 shapes.", True),
        (gold("count", "3", ["1", "2", "3"]), "There are three shapes.", True),
        (gold("count", "3", ["1", "2", "3"]), "There are 2 or 3 shapes.", False),
        (gold("count", "3", ["1", "2", "3"]), "There are 13 shapes.", False),
        (gold("exist", "yes", ["yes", "no"]), "Yes, there is a red circle.", True),
        (gold("exist", "no", ["yes", "no"]), "No, there is no red circle.", True),
        (gold("exist", "no", ["yes", "no"]), "Yes or no.", False),
        (
            gold("position", "center", ["left", "right", "top", "bottom", "center"]),
            "It is in the middle.",
            True,
        ),
        (gold("position", "left", ["left", "right", "top", "bottom", "center"]), "On the left.", True),
        (gold("position", "left", ["left", "right", "top", "bottom", "center"]), "At the top left.", False),
        (
            gold("closest", "red circle", ["red circle", "blue square"]),
            "The red circle is closest to the top.",
            True,
        ),
        (
            gold("closest", "red circle", ["red circle", "blue square"]),
            "The blue square is closest to the top.",
            False,
        ),
        (
            gold("closest", "red circle", ["red circle", "blue square"]),
            "The red circle or the blue square.",
            False,
        ),
        (gold("closest", "red circle", ["red circle", "blue square"]), "The red square.", False),
        (gold("remove", "2", ["0", "1", "2"]), "Without the red circle, 2 shapes would remain.", True),
        (gold("remove", "2", ["0", "1", "2"]), "Without the red circle, one shape would remain.", False),
    ],
)
def test_is_correct(row, answer, ok):
    assert is_correct(row, answer) is ok


def test_score_answers_per_type_and_overall():
    truth = [
        gold("color", "red", COLORS, 0),
        gold("color", "blue", COLORS, 1),
        gold("exist", "yes", ["yes", "no"], 2),
        gold("count", "1", ["1", "2", "3"], 3),
    ]
    answers = [
        {"question_id": 0, "text": "The square is red."},
        {"question_id": 1, "text": "The square is red."},
        {"question_id": 2, "text": "Yes, there is."},
        {"question_id": 99, "text": "stray"},
    ]
    result = score_answers(answers, truth)
    assert result["per_type"]["color"] == {
        "correct": 1,
        "total": 2,
        "accuracy": 0.5,
        "chance": pytest.approx(1 / 6),
    }
    assert result["per_type"]["exist"]["accuracy"] == 1.0
    assert result["per_type"]["count"]["accuracy"] == 0.0
    assert result["overall"]["correct"] == 2 and result["overall"]["total"] == 4
    assert result["missing"] == 1 and result["unknown_ids"] == 1
    table = format_table({"model": result, "blank": score_answers([], truth)})
    assert "| color | 2 | 50.0% | 0.0% | 16.7% |" in table
    assert "| overall | 4 | 50.0% | 0.0% |" in table


def test_score_answers_reads_the_gold_file(tmp_path):
    path = tmp_path / "answers_gt.jsonl"
    path.write_text('{"question_id": 7, "category": "exist", "key": "no", "candidates": ["yes", "no"]}\n\n')
    assert score_answers([{"question_id": "7", "text": "No."}], path)["overall"]["accuracy"] == 1.0


def test_accuracy_by_object_count_splits_each_type_by_scene_size():
    positions = ["bottom", "center", "left", "right", "top"]
    scenes = [
        {"scene_id": "one", "objects": [{}]},
        {"scene_id": "three", "objects": [{}, {}, {}]},
    ]
    truth = [
        {**gold("position", "left", positions, 0), "scene_id": "one"},
        {**gold("position", "left", positions, 1), "scene_id": "three"},
        {**gold("position", "top", positions, 2), "scene_id": "three"},
        {**gold("count", "3", ["1", "2", "3"], 3), "scene_id": "three"},
    ]
    answers = [  # question 3 unanswered: wrong, not dropped
        {"question_id": 0, "text": "The red circle is on the left."},
        {"question_id": 1, "text": "The blue square is on the left."},
        {"question_id": 2, "text": "The green circle is on the left."},
    ]
    split = accuracy_by_object_count(answers, truth, scenes)
    assert list(split) == ["count", "position"]  # the question types' own order
    assert split["position"] == {
        1: {"correct": 1, "total": 1, "accuracy": 1.0},
        3: {"correct": 1, "total": 2, "accuracy": 0.5},
    }
    assert split["count"] == {3: {"correct": 0, "total": 1, "accuracy": 0.0}}


def test_accuracy_by_object_count_names_a_question_without_its_scene():
    truth = [{**gold("count", "1", ["1", "2", "3"], 5), "scene_id": "lost"}]
    with pytest.raises(ValueError, match="question 5: scene 'lost'"):
        accuracy_by_object_count([], truth, [{"scene_id": "other", "objects": [{}]}])
