"""POPE: object-hallucination yes/no questions, parsed and scored as LLaVA does, per split.

Inputs are the POPE release's label files `coco_pope_{random,popular,adversarial}.json` (JSON lines:
`question_id`, `image`, `text`, `label` yes/no). The three files reuse the same question ids, so the question
file written here names each question `<split>/<question_id>`; answers are matched by that id rather than by
line position (LLaVA's `eval_pope.py` zips answers and labels by position, which silently misaligns when a
line is missing). Parsing is LLaVA's rule: keep the first sentence, drop commas, split on spaces, and answer
"no" when a word is `No`, `no` or `not`; everything else, "Not sure." included, is "yes".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llava_lit.qa_files import Question

log = logging.getLogger(__name__)

SPLITS = ("random", "popular", "adversarial")
INSTRUCTION = "Answer the question using a single word or phrase."
"""LLaVA-1.5's short-answer suffix, appended on its own line (as in its `llava_pope_test.jsonl`)."""

_NO_WORDS = {"No", "not", "no"}


def parse_yes(text: str) -> bool:
    """True when LLaVA's rule reads `text` as "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not any(w in _NO_WORDS for w in words)


@dataclass(frozen=True)
class PopeLabel:
    """One line of a POPE label file."""

    question_id: str
    image: str
    text: str
    label: bool
    """True for "yes" (the object is present)."""


def read_labels(path: str | Path) -> list[PopeLabel]:
    """Read one `coco_pope_<split>.json` label file (JSON lines); a bad line is an error naming it."""
    labels = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("label") not in ("yes", "no"):
                raise ValueError(f"{path}:{lineno}: label must be 'yes' or 'no', got {row.get('label')!r}")
            labels.append(
                PopeLabel(str(row["question_id"]), row["image"], row["text"], row["label"] == "yes")
            )
    return labels


def split_metrics(
    labels: list[PopeLabel], answers: dict[str, str], split: str
) -> dict[str, float | int | None]:
    """Accuracy, precision, recall, F1 and yes-ratio (percent) of one split.

    An unanswered question counts wrong: a false negative when its label is yes, and neither true nor false
    positive otherwise; the yes-ratio is over answered questions. Ratios with a zero denominator are None.
    """
    tp = fp = tn = fn = missing = yes = 0
    for lab in labels:
        qid = f"{split}/{lab.question_id}"
        if qid not in answers:
            missing += 1
            fn += lab.label
            continue
        pred = parse_yes(answers[qid])
        yes += pred
        tp += pred and lab.label
        fp += pred and not lab.label
        tn += not pred and not lab.label
        fn += not pred and lab.label
    n = len(labels)
    precision = 100.0 * tp / (tp + fp) if tp + fp else None
    recall = 100.0 * tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None
    else:  # no true positive at all makes both zero: F1 is 0, not a division by zero
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    answered = n - missing
    return {
        "acc": 100.0 * (tp + tn) / n if n else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": 100.0 * yes / answered if answered else None,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "missing": missing,
    }


@dataclass
class PopeBenchmark:
    """POPE from its official label files."""

    annotation_dir: str
    """Folder holding `coco_pope_<split>.json` for every split in `splits`."""
    image_folder: str
    """Folder holding the COCO val2014 images the label files name."""
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    """Which splits to evaluate."""
    instruction: str = INSTRUCTION
    """Suffix appended on its own line to every question."""
    limit: int | None = None
    """Evaluate only the first `limit` questions of each split."""

    def __post_init__(self) -> None:
        self._labels: dict[str, list[PopeLabel]] = {}
        for split in self.splits:
            path = Path(self.annotation_dir) / f"coco_pope_{split}.json"
            if not path.is_file():
                raise FileNotFoundError(f"POPE split {split!r}: no label file {path}")
            self._labels[split] = read_labels(path)[: self.limit]

    def questions(self) -> list[Question]:
        """Every labelled question, ids `<split>/<question_id>`, category = split."""
        return [
            Question(f"{split}/{lab.question_id}", lab.image, f"{lab.text}\n{self.instruction}", split)
            for split, labels in self._labels.items()
            for lab in labels
        ]

    def reference(self, question_id: str) -> str:
        """The label, "yes" or "no"."""
        split, qid = question_id.split("/", 1)
        return next("yes" if lab.label else "no" for lab in self._labels[split] if lab.question_id == qid)

    def score(self, answers: dict[str, str]) -> dict[str, dict[str, float | int | None]]:
        """Metrics per split plus their mean (LLaVA-1.5 reports the mean F1 over the three splits)."""
        metrics = {split: split_metrics(labels, answers, split) for split, labels in self._labels.items()}
        missing = sum(m["missing"] for m in metrics.values())
        if missing:
            log.warning("POPE: %d questions have no answer; counted wrong", missing)
        mean: dict[str, float | int | None] = {}
        for key in ("acc", "precision", "recall", "f1", "yes_ratio"):
            values = [m[key] for m in metrics.values()]
            mean[key] = sum(values) / len(values) if values and None not in values else None
        mean["n"] = sum(m["n"] for m in metrics.values())
        metrics["mean"] = mean
        return metrics
