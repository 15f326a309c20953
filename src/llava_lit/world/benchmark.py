"""The miniature world's held-out VQA as an eval benchmark: its question file in, accuracy per question type out.

The world writes its held-out questions in the official question format and the gold keys beside them;
scoring is the world's own strict scorer (`llava_lit.world.score.score_answers`). This adapter only gives
them the benchmark shape the eval front end and the training callback use.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_lit.eval.report import Metrics
from llava_lit.qa_files import Question, read_questions


@dataclass
class WorldBenchmark:
    """The world's held-out questions (`eval/` of a built world)."""

    question_file: str
    """The world's held-out question JSONL (official question format)."""
    answers_gt: str
    """The world's `answers_gt.jsonl` (gold keys per question)."""
    image_folder: str
    """Folder the question file's image paths are relative to."""
    limit: int | None = None
    """Evaluate only the first `limit` questions."""
    per_type: int | None = None
    """Keep only the first `per_type` questions of each question type (a small sample covering every type)."""

    def __post_init__(self) -> None:
        from llava_lit.world.score import load_jsonl

        questions = read_questions(self.question_file)
        if self.per_type is not None:
            seen: dict[str, int] = {}
            kept = []
            for q in questions:
                seen[q.category] = seen.get(q.category, 0) + 1
                if seen[q.category] <= self.per_type:
                    kept.append(q)
            questions = kept
        self._questions = questions[: self.limit]
        ids = {q.question_id for q in self._questions}
        self._gold = [g for g in load_jsonl(self.answers_gt) if str(g["question_id"]) in ids]
        if len(self._gold) != len(ids):
            raise ValueError(
                f"{self.answers_gt} has gold answers for {len(self._gold)} of {len(ids)} questions"
            )

    def questions(self) -> list[Question]:
        """The held-out questions as the world wrote them."""
        return self._questions

    def gold(self) -> list[dict]:
        """The `answers_gt.jsonl` rows of `questions()`, in file order."""
        return self._gold

    def reference(self, question_id: str) -> str:
        """The world's reference answer sentence."""
        return str(next(g["answer"] for g in self._gold if str(g["question_id"]) == question_id))

    def score(self, answers: dict[str, str]) -> Metrics:
        """Accuracy (percent) overall and per question type, with chance level beside it."""
        from llava_lit.world.score import score_answers

        result = score_answers([{"question_id": q, "text": t} for q, t in answers.items()], self._gold)
        rows = {"overall": result["overall"], **result["per_type"]}
        metrics: Metrics = {
            row: {"acc": 100.0 * s["accuracy"], "chance": 100.0 * s["chance"], "n": s["total"]}
            for row, s in rows.items()
        }
        metrics["overall"].update(missing=result["missing"], unknown_ids=result["unknown_ids"])
        return metrics
