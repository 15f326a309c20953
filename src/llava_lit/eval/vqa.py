"""Open-ended VQA scoring (VQAv2, TextVQA, GQA): the EvalAI-style answer normaliser, soft accuracy, exact match.

The normaliser implements the rules the VQA challenge (and LLaVA's TextVQA scorer) apply to every answer before
comparing: lowercase; split off possessive "'s"; strip punctuation (removed outright when it touches a space or
the text has a digit-comma-digit, otherwise replaced by a space); drop periods not followed by a digit; turn
number words into digits; drop the articles a/an/the; restore the apostrophe of contractions typed without one
("dont" -> "don't"). Soft accuracy is the VQA metric: for each of the 10 annotators, min(1, matches among the
other 9 / 3), averaged. GQA has a single answer per question and is scored by exact match after LLaVA's
conversion (`rstrip('.')`, lowercase).

Inputs are the official files: VQAv2 `v2_OpenEnded_mscoco_<split>_questions.json` + `v2_mscoco_<split>_annotations.json`,
TextVQA `TextVQA_0.5.1_<split>.json`, GQA `<split>_balanced_questions.json`.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

from llava_lit.qa_files import Question

log = logging.getLogger(__name__)

INSTRUCTION = "Answer the question using a single word or phrase."
"""LLaVA-1.5's short-answer suffix, appended on its own line."""

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've she's should've shouldn't shouldn't've
somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've
wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd
you'd've you'll you're you've
""".split()
_REAL_WORDS = {"id", "ill", "its", "well", "were", "wed", "shed", "hell", "shell", "lets", "whos"}
"""Apostrophe-less spellings that are ordinary words ("its", "well", ...): left alone rather than "restored"."""


def _contraction_map() -> dict[str, str]:
    """Every spelling of each contraction with some of its apostrophes missing -> the canonical spelling."""
    table = {}
    for canonical in _CONTRACTIONS:
        parts = canonical.split("'")
        for keep in itertools.product((True, False), repeat=len(parts) - 1):
            if all(keep):
                continue
            variant = parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:], strict=True))
            if variant not in _REAL_WORDS:
                table[variant] = canonical
    return table


_CONTRACTION_MAP = _contraction_map()


def normalize_answer(text: str) -> str:
    """The EvalAI-style normal form of an answer (see the module docstring for the rules)."""
    text = text.replace("\n", " ").replace("\t", " ").lower().replace("'s", " 's").strip()
    remove_outright = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        if p not in text:
            continue
        touches_space = f"{p} " in text or f" {p}" in text
        text = text.replace(p, "" if touches_space or remove_outright else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    words = [_CONTRACTION_MAP.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def soft_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """VQA accuracy in [0, 1] of one prediction against its annotators' answers (all normalised here)."""
    if not gt_answers:
        raise ValueError("soft accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in gt_answers]
    scores = [min(1.0, sum(g == pred for g in gts[:i] + gts[i + 1 :]) / 3.0) for i in range(len(gts))]
    return sum(scores) / len(scores)


def majority_answer(gt_answers: list[str]) -> str:
    """The most frequent normalised answer (first seen wins a tie): the target of exact-match accuracy."""
    return Counter(normalize_answer(a) for a in gt_answers).most_common(1)[0][0]


def gqa_normalize(text: str) -> str:
    """LLaVA's GQA conversion: strip, drop trailing periods, lowercase."""
    return text.strip().rstrip(".").lower()


@dataclass(frozen=True)
class VQAItem:
    """One question with its references, whatever the source format."""

    question_id: str
    image: str
    question: str
    answers: list[str]
    """10 annotator answers (VQAv2/TextVQA) or the single GQA answer."""
    category: str
    """Answer type (VQAv2), structural type (GQA), or "" (TextVQA)."""


def load_items(fmt: str, questions: str, annotations: str | None = None) -> list[VQAItem]:
    """Read the official files of `fmt` ("vqav2", "textvqa" or "gqa") into items."""
    with open(questions, encoding="utf-8") as f:
        qdata = json.load(f)
    if fmt == "textvqa":
        return [
            VQAItem(str(q["question_id"]), f"{q['image_id']}.jpg", q["question"], list(q["answers"]), "")
            for q in qdata["data"]
        ]
    if fmt == "gqa":
        return [
            VQAItem(
                str(qid),
                f"{q['imageId']}.jpg",
                q["question"],
                [q["answer"]],
                q.get("types", {}).get("structural", ""),
            )
            for qid, q in qdata.items()
        ]
    if fmt == "vqav2":
        if annotations is None:
            raise ValueError("VQAv2 needs `annotations` (v2_mscoco_<split>_annotations.json)")
        with open(annotations, encoding="utf-8") as f:
            anns = {str(a["question_id"]): a for a in json.load(f)["annotations"]}
        subtype = qdata["data_subtype"]
        items = []
        for q in qdata["questions"]:
            qid = str(q["question_id"])
            if qid not in anns:
                raise ValueError(f"VQAv2 question {qid} has no annotation in {annotations}")
            ann = anns[qid]
            image = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
            items.append(
                VQAItem(qid, image, q["question"], [a["answer"] for a in ann["answers"]], ann["answer_type"])
            )
        return items
    raise ValueError(f"unknown VQA format {fmt!r}; expected vqav2, textvqa or gqa")


@dataclass
class VQABenchmark:
    """VQAv2, TextVQA or GQA from the official files."""

    format: Literal["vqav2", "textvqa", "gqa"]
    """Which official layout `question_file`/`annotation_file` follow (also picks the scoring: soft accuracy or GQA match)."""
    question_file: str
    """The official question file (TextVQA and GQA files carry the answers too)."""
    image_folder: str
    """Folder holding the images the question file names."""
    annotation_file: str | None = None
    """VQAv2 only: the annotation file with 10 answers per question."""
    instruction: str = INSTRUCTION
    """Suffix appended on its own line to every question."""
    limit: int | None = None
    """Evaluate only the first `limit` questions."""

    def __post_init__(self) -> None:
        self._items = load_items(self.format, self.question_file, self.annotation_file)[: self.limit]

    def questions(self) -> list[Question]:
        """One question per item, category = answer type / structural type."""
        return [
            Question(i.question_id, i.image, f"{i.question}\n{self.instruction}", i.category)
            for i in self._items
        ]

    def reference(self, question_id: str) -> str:
        """The most frequent (normalised) reference answer."""
        item = next(i for i in self._items if i.question_id == question_id)
        return majority_answer(item.answers) if self.format != "gqa" else item.answers[0]

    def score(self, answers: dict[str, str]) -> dict[str, dict[str, float | int | None]]:
        """Exact match (and soft accuracy except for GQA), percent, overall and per category."""
        sums: dict[str, Counter] = defaultdict(Counter)
        for item in self._items:
            rows = ["overall"] + ([item.category] if item.category else [])
            pred = answers.get(item.question_id)
            for row in rows:
                sums[row]["n"] += 1
                sums[row]["missing"] += pred is None
                if pred is None:
                    continue
                if self.format == "gqa":
                    sums[row]["exact_match"] += gqa_normalize(pred) == gqa_normalize(item.answers[0])
                else:
                    sums[row]["exact_match"] += normalize_answer(pred) == majority_answer(item.answers)
                    sums[row]["soft_acc"] += soft_accuracy(pred, item.answers)
        if sums["overall"]["missing"]:
            log.warning(
                "%s: %d questions have no answer; counted wrong", self.format, sums["overall"]["missing"]
            )
        keys = ("exact_match",) if self.format == "gqa" else ("soft_acc", "exact_match")
        metrics: dict[str, dict[str, float | int | None]] = {}
        for row in ["overall"] + sorted(r for r in sums if r != "overall"):
            s = sums[row]
            metrics[row] = {k: 100.0 * s[k] / s["n"] for k in keys} | {"n": s["n"], "missing": s["missing"]}
        return metrics
