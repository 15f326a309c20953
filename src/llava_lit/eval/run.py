"""The evaluation API: one benchmark object's questions -> answers -> metrics, as `python -m llava_lit.eval` runs it.

Applications (the miniature world's `evaluate`) call `evaluate` here rather than the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llava_lit.eval.report import Metrics, print_table, write_metrics
from llava_lit.qa_files import read_answers, write_questions

log = logging.getLogger(__name__)


def predict_answers(
    questions_file: Path,
    image_folder: str,
    answers_file: Path,
    *,
    checkpoint: str,
    batch_size: int,
    max_new_tokens: int,
    load: Mapping[str, Any] | None = None,
) -> None:
    """Run the project's batched prediction (the single call site of `llava_lit.predict` in evaluation)."""
    from llava_lit.predict import predict  # loads the model stack; not needed when re-scoring

    predict(
        questions_file,
        image_folder,
        answers_file,
        checkpoint=checkpoint,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        **(load or {}),
    )


def evaluate(
    benchmark: Any,
    name: str,
    output_dir: str | Path,
    *,
    answers_file: str | None = None,
    checkpoint: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    load: Mapping[str, Any] | None = None,
) -> Metrics:
    """Questions -> answers -> metrics for one benchmark object; writes `questions.jsonl`, `metrics.json`.

    With `answers_file` the given answers are scored and nothing is predicted; otherwise `checkpoint` is
    required and the answers are written to `<output_dir>/answers.jsonl`. `load` holds `LoadSettings` fields
    (`conf/load/default.yaml`) for loading the checkpoint.
    """
    out = Path(output_dir)
    questions_file = out / "questions.jsonl"
    n_questions = write_questions(questions_file, benchmark.questions())
    log.info("%s: %d questions written to %s", name, n_questions, questions_file)
    if answers_file is None:
        if checkpoint is None:
            raise ValueError("give `checkpoint=` to predict, or `answers_file=` to score existing answers")
        answers_path = out / "answers.jsonl"
        predict_answers(
            questions_file,
            benchmark.image_folder,
            answers_path,
            checkpoint=checkpoint,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            load=load,
        )
    else:
        answers_path = Path(answers_file)
    metrics = benchmark.score(read_answers(answers_path))
    metrics_file = write_metrics(
        out / "metrics.json",
        name,
        metrics,
        answers_file=str(answers_path),
        questions=n_questions,
        checkpoint=checkpoint,
    )
    print_table(f"{name} ({answers_path})", metrics)
    log.info("metrics written to %s", metrics_file)
    return metrics
