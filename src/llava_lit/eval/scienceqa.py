"""ScienceQA: the official prompt, LLaVA's answer parsing, and accuracy by subject, context and grade.

Inputs are the files users already have: the ScienceQA release's `problems.json` (pid -> problem with
`question`, `choices`, `answer`, `hint`, `image`, `subject`, `grade`) and `pid_splits.json` (split -> pids), and
optionally LLaVA's `llava_test_CQM-A.json` whose first human turn is the prompt LLaVA-1.5 was evaluated with.
Parsing follows LLaVA's `eval_science_qa.py` exactly, because that is what the published numbers used: an
answer is a bare letter, a letter followed by ". ", or exactly one "The answer is X." match; anything else
(lowercase letters, two conflicting "The answer is" sentences, a letter past the last choice, no answer at
all) counts as wrong. The category breakdown (NAT/SOC/LAN, TXT/IMG/NO, G1-6/G7-12) follows the ScienceQA
toolkit's definitions, which LLaVA's script does not compute.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from llava_lit.qa_files import Question

log = logging.getLogger(__name__)

OPTION_LETTERS = ("A", "B", "C", "D", "E")
"""The letters LLaVA's scorer accepts; ScienceQA problems have at most five choices."""

INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's single-prediction suffix, appended on its own line."""

_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
"""LLaVA's pattern, unescaped dot included: it needs one character (any) after the letter."""

_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_LOW_GRADES = {f"grade{i}" for i in range(1, 7)}
_HIGH_GRADES = {f"grade{i}" for i in range(7, 13)}
ROWS = ("overall", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
"""Metric rows in print order. IMG (problems with an image) is also LLaVA's "IMG-Accuracy", the SQA-IMG number."""


def build_prompt(problem: dict) -> str:
    """The LLaVA-1.5 prompt for one problem: context line (if any), question, `A. ...` options, instruction."""
    choices = problem["choices"]
    if not 2 <= len(choices) <= len(OPTION_LETTERS):
        raise ValueError(f"ScienceQA problem has {len(choices)} choices; expected 2 to {len(OPTION_LETTERS)}")
    lines = [f"Context: {problem['hint']}"] if problem.get("hint") else []
    lines.append(problem["question"])
    lines += [f"{letter}. {choice}" for letter, choice in zip(OPTION_LETTERS, choices, strict=False)]
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def parse_answer(text: str) -> str | None:
    """The option letter LLaVA's scorer reads from `text`, or None where it reads none ("FAILED")."""
    if text in OPTION_LETTERS:
        return text
    if len(text) >= 3 and text[0] in OPTION_LETTERS and text[1:3] == ". ":
        return text[0]
    matches = _ANSWER_IS.findall(text)
    return matches[0] if len(matches) == 1 else None


def categories(problem: dict) -> list[str]:
    """The breakdown rows (besides `overall`) that one problem counts towards."""
    rows = []
    if problem.get("subject") in _SUBJECTS:
        rows.append(_SUBJECTS[problem["subject"]])
    if problem.get("hint"):
        rows.append("TXT")
    if problem.get("image"):
        rows.append("IMG")
    if not problem.get("hint") and not problem.get("image"):
        rows.append("NO")
    if problem.get("grade") in _LOW_GRADES:
        rows.append("G1-6")
    elif problem.get("grade") in _HIGH_GRADES:
        rows.append("G7-12")
    return rows


@dataclass
class ScienceQABenchmark:
    """ScienceQA from its official release files."""

    problems: str
    """Path to the release's `problems.json`."""
    pid_splits: str
    """Path to the release's `pid_splits.json`."""
    image_folder: str
    """Folder holding `<pid>/image.png` for the split (the release's `images/<split>`)."""
    split: str = "test"
    """Which `pid_splits.json` split to evaluate (the paper's numbers are on `test`, 4241 problems)."""
    llava_questions: str | None = None
    """Optional LLaVA `llava_test_CQM-A.json`: take prompts from its first human turn instead of building them."""
    limit: int | None = None
    """Evaluate only the first `limit` problems of the split (for quick checks during training)."""

    def __post_init__(self) -> None:
        with open(self.problems, encoding="utf-8") as f:
            self._problems: dict[str, dict] = json.load(f)
        with open(self.pid_splits, encoding="utf-8") as f:
            splits = json.load(f)
        if self.split not in splits:
            raise ValueError(f"split {self.split!r} is not in {self.pid_splits} (has {sorted(splits)})")
        pids = [str(p) for p in splits[self.split]]
        unknown = [p for p in pids if p not in self._problems]
        if unknown:
            raise ValueError(
                f"{len(unknown)} pids of split {self.split!r} are not in {self.problems}: {unknown[:5]}"
            )
        self._pids = pids[: self.limit] if self.limit is not None else pids

    def questions(self) -> list[Question]:
        """One question per problem of the split, with the official prompt."""
        prompts = self._llava_prompts() if self.llava_questions else {}
        out = []
        for pid in self._pids:
            problem = self._problems[pid]
            text = prompts[pid] if prompts else build_prompt(problem)
            image = f"{pid}/{problem['image']}" if problem.get("image") else None
            out.append(Question(question_id=pid, image=image, text=text, category=problem.get("subject", "")))
        return out

    def _llava_prompts(self) -> dict[str, str]:
        """Prompts as LLaVA's `model_vqa_science --single-pred-prompt` builds them from `llava_test_CQM-A.json`."""
        with open(self.llava_questions, encoding="utf-8") as f:
            records = json.load(f)
        prompts = {
            str(r["id"]): r["conversations"][0]["value"].replace("<image>", "").strip() + "\n" + INSTRUCTION
            for r in records
        }
        missing = [p for p in self._pids if p not in prompts]
        if missing:
            raise ValueError(
                f"{len(missing)} problems of split {self.split!r} are not in {self.llava_questions}"
            )
        return prompts

    def reference(self, question_id: str) -> str:
        """The correct option, as "B. <choice>"."""
        problem = self._problems[question_id]
        return f"{OPTION_LETTERS[problem['answer']]}. {problem['choices'][problem['answer']]}"

    def score(self, answers: dict[str, str]) -> dict[str, dict[str, float | int | None]]:
        """Accuracy (percent) overall and per category; unanswered and unparsable problems count as wrong."""
        correct = dict.fromkeys(ROWS, 0)
        total = dict.fromkeys(ROWS, 0)
        unparsed = missing = 0
        for pid in self._pids:
            problem = self._problems[pid]
            if pid not in answers:
                missing += 1
                letter = None
            else:
                letter = parse_answer(answers[pid])
                unparsed += letter is None
            # A letter past the problem's last choice (or any letter outside A-E) is wrong, as in LLaVA.
            valid = OPTION_LETTERS[: len(problem["choices"])]
            hit = letter in valid and valid.index(letter) == problem["answer"]
            for row in ("overall", *categories(problem)):
                total[row] += 1
                correct[row] += hit
        if missing:
            log.warning(
                "ScienceQA: %d of %d problems have no answer; counted wrong", missing, len(self._pids)
            )
        unknown = len(set(answers) - set(self._pids))
        if unknown:
            log.warning(
                "ScienceQA: %d answers are for problems outside the evaluated split; ignored", unknown
            )
        metrics: dict[str, dict[str, float | int | None]] = {
            row: {"acc": 100.0 * correct[row] / total[row] if total[row] else None, "n": total[row]}
            for row in ROWS
        }
        metrics["overall"].update(correct=correct["overall"], unparsed=unparsed, missing=missing)
        return metrics
