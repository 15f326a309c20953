"""MME: yes/no questions per subtask, scored as the official `eval_tool/calculation.py` does.

Two inputs are accepted. (1) The MME release folder, one folder per subtask holding images and one
`questions_answers_YN` txt per image (`question<TAB>Yes|No`, two lines: one question answered yes, one no);
some subtasks keep the txt files in `questions_answers_YN/` next to `images/`, the others beside the images.
Questions are built from it and scored from an answer JSONL. (2) A folder of LLaVA-converted results, one
`<subtask>.txt` per subtask with lines `image<TAB>question<TAB>gt<TAB>prediction` (what LLaVA's
`convert_answer_to_mme.py` writes for the official tool), scored directly.

Per subtask: accuracy over questions and accuracy+ over images (both of an image's questions right), in
percent; the subtask score is their sum (0-200). Perception and cognition totals sum their subtasks' scores
(LLaVA-1.5-7B's published 1510.7 is the perception total). A prediction reads "yes"/"no" when it is exactly
that (lowercased) or when its first four characters contain "yes" (checked first) or "no"; anything else is
"other" and wrong.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from llava_lit.qa_files import Question

log = logging.getLogger(__name__)

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
INSTRUCTION = "Answer the question using a single word or phrase."
"""LLaVA-1.5's suffix, appended on its own line after MME's own "Please answer yes or no."."""

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def parse_yes_no(text: str) -> str:
    """ "yes", "no" or "other", by the official tool's rule."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass(frozen=True)
class MMERecord:
    """One scored MME question."""

    subtask: str
    image: str
    question: str
    gt: str
    """"yes" or "no"."""
    prediction: str | None
    """The model's raw answer; None when the question went unanswered."""


def score_records(records: list[MMERecord]) -> dict[str, dict[str, float | int | None]]:
    """Per-subtask acc / acc+ / score, then `perception` and `cognition` totals over the subtasks present."""
    by_subtask: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other: dict[str, int] = defaultdict(int)
    missing: dict[str, int] = defaultdict(int)
    for r in records:
        pred = parse_yes_no(r.prediction) if r.prediction is not None else "other"
        other[r.subtask] += pred == "other"
        missing[r.subtask] += r.prediction is None
        by_subtask[r.subtask][r.image].append(pred == r.gt)
    metrics: dict[str, dict[str, float | int | None]] = {}
    for subtask in sorted(by_subtask, key=_subtask_order):
        images = by_subtask[subtask]
        hits = [h for per_image in images.values() for h in per_image]
        acc = 100.0 * sum(hits) / len(hits)
        acc_plus = 100.0 * sum(all(v) for v in images.values()) / len(images)
        metrics[subtask] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
            "n": len(hits),
            "images": len(images),
            "other": other[subtask],
            "missing": missing[subtask],
        }
        odd = sum(len(v) != 2 for v in images.values())
        if odd:
            log.warning("MME %s: %d images do not have exactly two questions", subtask, odd)
    for total, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [s for s in members if s in metrics]
        if present:
            metrics[total] = {"score": sum(metrics[s]["score"] for s in present), "subtasks": len(present)}
            if len(present) < len(members):
                log.warning("MME %s total covers %d of %d subtasks", total, len(present), len(members))
    unknown = [s for s in by_subtask if s not in PERCEPTION + COGNITION]
    if unknown:
        log.warning("MME subtasks outside the official lists (in no total): %s", unknown)
    return metrics


def _subtask_order(name: str) -> tuple[int, str]:
    official = PERCEPTION + COGNITION
    return (official.index(name), "") if name in official else (len(official), name)


def read_llava_results(results_dir: str | Path) -> list[MMERecord]:
    """Records from LLaVA-converted result files `<subtask>.txt` (`image\\tquestion\\tgt\\tprediction`)."""
    records = []
    files = sorted(Path(results_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no <subtask>.txt result files in {results_dir}")
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t", 3)  # the prediction is last, so a tab inside it stays in it
            if len(fields) != 4:
                raise ValueError(
                    f"{path}:{lineno}: expected image, question, gt, prediction separated by tabs"
                )
            image, question, gt, pred = fields
            records.append(MMERecord(path.stem, image, question, _gt(gt, path, lineno), pred))
    return records


def _gt(raw: str, path: Path, lineno: int) -> str:
    gt = raw.strip().lower()
    if gt not in ("yes", "no"):
        raise ValueError(f"{path}:{lineno}: ground truth must be Yes or No, got {raw!r}")
    return gt


@dataclass
class MMEBenchmark:
    """MME from the official release folder."""

    root: str
    """The release folder (`MME_Benchmark_release_version`), one folder per subtask."""
    instruction: str = INSTRUCTION
    """Suffix appended on its own line to every question."""
    limit: int | None = None
    """Evaluate only the first `limit` images (both their questions) of each subtask."""

    @property
    def image_folder(self) -> str:
        """Question image paths are `<subtask>/.../<image>` relative to the release folder."""
        return self.root

    def __post_init__(self) -> None:
        self._items: list[
            tuple[str, str, MMERecord]
        ] = []  # (question id, image path, record sans prediction)
        root = Path(self.root)
        subtasks = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: _subtask_order(d.name))
        if not subtasks:
            raise FileNotFoundError(f"no MME subtask folders in {root}")
        for sub in subtasks:
            qa_dir, image_dir = (
                (sub / "questions_answers_YN", sub / "images") if (sub / "images").is_dir() else (sub, sub)
            )
            txts = sorted(qa_dir.glob("*.txt"))[: self.limit]
            if not txts:
                raise FileNotFoundError(f"MME subtask {sub.name}: no question files in {qa_dir}")
            for txt in txts:
                image = _find_image(image_dir, txt.stem)
                rel_image = image.relative_to(root).as_posix()
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                for k, line in enumerate(lines):
                    fields = line.strip().split("\t")
                    if len(fields) != 2:
                        raise ValueError(f"{txt}: line {k + 1} should be question<TAB>answer")
                    qid = f"{sub.name}/{image.name}/{k}"
                    gt = _gt(fields[1], txt, k + 1)
                    self._items.append((qid, rel_image, MMERecord(sub.name, image.name, fields[0], gt, None)))

    def questions(self) -> list[Question]:
        """Two questions per image; ids `<subtask>/<image file>/<line index>`, category = subtask."""
        return [
            Question(qid, image, f"{rec.question}\n{self.instruction}", rec.subtask)
            for qid, image, rec in self._items
        ]

    def reference(self, question_id: str) -> str:
        """The ground truth, "yes" or "no"."""
        return next(rec.gt for qid, _, rec in self._items if qid == question_id)

    def score(self, answers: dict[str, str]) -> dict[str, dict[str, float | int | None]]:
        """Score the answers of an answer file against the release's ground truth."""
        records = [
            MMERecord(r.subtask, r.image, r.question, r.gt, answers.get(qid)) for qid, _, r in self._items
        ]
        missing = sum(r.prediction is None for r in records)
        if missing:
            log.warning("MME: %d questions have no answer; counted wrong", missing)
        return score_records(records)


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in _IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(f"MME: no image {stem}{{{','.join(_IMAGE_SUFFIXES)}}} in {folder}")
