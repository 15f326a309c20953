"""ScienceQA: LLaVA's answer parsing corner cases, the official prompt, and hand-counted category accuracies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava_lit.eval.__main__ import benchmark_shorthand, evaluate
from llava_lit.eval.scienceqa import ScienceQABenchmark, build_prompt, parse_answer
from llava_lit.qa_files import read_questions


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("B. because the moon is made of rock", "B"),
        ("Dogs bark, so dogs can hear. The answer is C.", "C"),
        ("The answer is A. Actually, The answer is B.", None),  # two conflicting answers
        ("The answer is A. Actually, the answer is B.", "A"),  # the pattern is case-sensitive
        ("The answer is A. I repeat: The answer is A.", None),  # LLaVA wants exactly one match
        ("c", None),  # lowercase fails
        ("C.", None),  # neither a bare letter nor "C. "
        ("The answer is C", None),  # LLaVA's regex needs one character after the letter
        ("(A)", None),
        ("", None),
        ("The answer is F.", "F"),  # parsed, then wrong for every problem (no sixth option)
    ],
)
def test_parse_answer_follows_llava(text: str, letter: str | None) -> None:
    assert parse_answer(text) == letter


def test_build_prompt_official_layout() -> None:
    problem = {"question": "Which is a mammal?", "choices": ["frog", "whale"], "hint": "Look closely."}
    assert build_prompt(problem) == (
        "Context: Look closely.\nWhich is a mammal?\nA. frog\nB. whale\n"
        "Answer with the option's letter from the given choices directly."
    )
    problem["hint"] = ""
    assert build_prompt(problem).startswith("Which is a mammal?\nA. frog\n")
    with pytest.raises(ValueError, match="6 choices"):
        build_prompt({**problem, "choices": list("abcdef")})


def _bench(root: Path, **kw) -> ScienceQABenchmark:
    return ScienceQABenchmark(
        problems=str(root / "problems.json"),
        pid_splits=str(root / "pid_splits.json"),
        image_folder=str(root / "images" / "test"),
        **kw,
    )


def test_questions_from_release_match_llava_cqm_a(scienceqa_dir: Path) -> None:
    built = _bench(scienceqa_dir).questions()
    from_llava = _bench(
        scienceqa_dir, llava_questions=str(scienceqa_dir / "llava_test_CQM-A.json")
    ).questions()
    assert [q.question_id for q in built] == ["1", "2", "3", "4", "5", "6"]  # the train pid 7 is not asked
    assert built == from_llava
    q4 = built[3]
    assert q4.image == "4/image.png" and (scienceqa_dir / "images" / "test" / q4.image).is_file()
    assert q4.text == (
        "Context: Read the map.\nQuestion 4?\nA. choice 4a\nB. choice 4b\nC. choice 4c\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert built[2].image is None and "<image>" not in built[0].text


ANSWERS = {
    "1": "A",  # right (NAT, IMG, G1-6)
    "2": "Plants make food. The answer is B.",  # right (NAT, TXT, G7-12)
    "3": "c",  # unparsable -> wrong (SOC, NO, G1-6)
    "4": "B. because of the map",  # right (SOC, TXT, IMG, G7-12)
    "5": "The answer is A. No. The answer is B.",  # conflicting -> wrong (LAN, NO, G1-6)
    # "6" unanswered -> wrong (LAN, IMG, G7-12)
    "7": "A",  # a train problem: ignored
}


def test_score_by_category_hand_counted(scienceqa_dir: Path) -> None:
    m = _bench(scienceqa_dir).score(ANSWERS)
    assert m["overall"] == {"acc": 50.0, "n": 6, "correct": 3, "unparsed": 2, "missing": 1}
    expected = {
        "NAT": (100.0, 2), "SOC": (50.0, 2), "LAN": (0.0, 2),
        "TXT": (100.0, 2), "IMG": (200 / 3, 3), "NO": (0.0, 2),
        "G1-6": (100 / 3, 3), "G7-12": (200 / 3, 3),
    }  # fmt: skip
    for row, (acc, n) in expected.items():
        assert m[row]["acc"] == pytest.approx(acc), row
        assert m[row]["n"] == n, row


def test_letter_past_last_choice_is_wrong(scienceqa_dir: Path) -> None:
    bench = _bench(scienceqa_dir)
    # Problem 6 has five choices with answer E; problem 2 has two, so "E" cannot be right there.
    assert bench.score({"6": "E"})["overall"]["correct"] == 1
    assert bench.score({"2": "E"})["overall"]["correct"] == 0
    assert bench.score({"2": "The answer is Z."})["overall"]["correct"] == 0


def test_unknown_split_is_a_clear_error(scienceqa_dir: Path) -> None:
    with pytest.raises(ValueError, match="split 'minitest'"):
        _bench(scienceqa_dir, split="minitest")


def test_evaluate_rescores_an_answer_file(scienceqa_dir: Path, tmp_path: Path, write_answers) -> None:
    answers = write_answers(tmp_path / "answers.jsonl", ANSWERS)
    out = tmp_path / "run"
    metrics = evaluate(_bench(scienceqa_dir), "scienceqa", out, answers_file=str(answers))
    assert metrics["overall"]["acc"] == 50.0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["benchmark"] == "scienceqa" and saved["metrics"]["IMG"]["n"] == 3
    assert [q.question_id for q in read_questions(out / "questions.jsonl")] == ["1", "2", "3", "4", "5", "6"]


def test_evaluate_without_answers_or_checkpoint_is_an_error(scienceqa_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        evaluate(_bench(scienceqa_dir), "scienceqa", tmp_path / "run")


def test_benchmark_shorthand() -> None:
    assert benchmark_shorthand(["m", "pope", "limit=3"]) == ["m", "benchmark=pope", "limit=3"]
    assert benchmark_shorthand(["m", "benchmark=pope"]) == ["m", "benchmark=pope"]
    assert benchmark_shorthand(["m", "--help"]) == ["m", "--help"]


def test_cli_end_to_end(scienceqa_dir: Path, tmp_path: Path, write_answers) -> None:
    answers = write_answers(tmp_path / "answers.jsonl", ANSWERS)
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable, "-m", "llava_lit.eval", "scienceqa",
            f"data_root={scienceqa_dir.parent}",
            f"benchmark.image_folder={scienceqa_dir / 'images' / 'test'}",
            f"benchmark.llava_questions={scienceqa_dir / 'llava_test_CQM-A.json'}",
            f"answers_file={answers}",
            f"hydra.run.dir={out}",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scienceqa" in result.stdout and "50.00" in result.stdout and "G7-12" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["metrics"]["SOC"]["acc"] == 50.0
