"""The official LLaVA question and answer JSONL files, read and written in one place.

The format belongs to prediction (`llava_lit.predict` reads question files and writes answer files); the
benchmarks of `llava_lit.eval` import it from here to write their question files and score answer files.

Every benchmark goes through the same two files: a question file (`question_id`, `image`, `text`, `category`)
that batched prediction reads, and an answer file (`question_id`, `prompt`, `text`, `answer_id`, `model_id`,
`metadata`) that it writes. Scorers only ever see `{question_id: answer text}`, so an answer file produced by the
official LLaVA scripts scores exactly like one produced here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """One line of an official question file."""

    question_id: str
    """Unique id; answers are matched to questions by it (always compared as a string)."""
    image: str | None
    """Image path relative to the benchmark's image folder; None for a text-only question."""
    text: str
    """The full user prompt, instruction suffix included, without the `<image>` marker."""
    category: str
    """Benchmark-specific group (POPE split, MME subtask, ScienceQA subject...)."""
    file_id: str | int | None = None
    """The id exactly as the question file wrote it (VQAv2 and MMBench use integers), which answer files echo
    back so the official submission converters match them; None = `question_id`."""

    @property
    def written_id(self) -> str | int:
        """The `question_id` an answer line carries: the question file's own value and type."""
        return self.question_id if self.file_id is None else self.file_id


def write_questions(path: str | Path, questions: Iterable[Question]) -> int:
    """Write `questions` as official question JSONL; returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for q in questions:
            row = {k: v for k, v in asdict(q).items() if k != "file_id"}
            row["question_id"] = q.written_id
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_questions(path: str | Path) -> list[Question]:
    """Read an official question JSONL file (extra keys are ignored, `image` may be absent)."""
    out = []
    for lineno, row in _read_jsonl(path):
        try:
            file_id = row["question_id"]
            if isinstance(file_id, bool) or not isinstance(file_id, (str, int)):
                raise ValueError(
                    f"{path}:{lineno}: question_id must be a string or an integer, got {file_id!r}"
                )
            out.append(
                Question(
                    question_id=str(file_id),
                    image=row.get("image"),
                    text=row["text"],
                    category=str(row.get("category", "")),
                    file_id=file_id,
                )
            )
        except KeyError as err:
            raise ValueError(f"{path}:{lineno}: question line lacks the field {err}") from None
    return out


def read_answers(path: str | Path) -> dict[str, str]:
    """Read an official answer JSONL file into `{question_id: text}`.

    A question answered twice keeps its last answer (a resumed prediction run appends) and the duplicate is
    logged; a line without `question_id` or `text` is an error naming the line.
    """
    answers: dict[str, str] = {}
    duplicates = 0
    for lineno, row in _read_jsonl(path):
        if "question_id" not in row or "text" not in row:
            raise ValueError(
                f"{path}:{lineno}: answer line needs `question_id` and `text`, got {sorted(row)}"
            )
        qid = str(row["question_id"])
        duplicates += qid in answers
        answers[qid] = str(row["text"])
    if duplicates:
        log.warning(
            "%s: %d question ids answered more than once; the last answer of each is scored", path, duplicates
        )
    return answers


def _read_jsonl(path: str | Path) -> Iterable[tuple[int, dict]]:
    """Yield `(line number, object)` for every non-blank line; a malformed line is an error naming it."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
