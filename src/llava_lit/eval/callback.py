"""During training: answer a fixed set of benchmark questions at each validation and log what the model says.

At the end of every validation epoch the callback asks the model the first `num_questions` questions of a
small benchmark (the same ones every time, so the table reads as a history), logs a W&B table (image, prompt,
answer, reference) when a `WandbLogger` is attached, and logs the benchmark's metrics through
`LightningModule.log_dict` (`<key>/<row>/<metric>`) for every logger. The benchmark object is any of the eval
benchmarks (`ScienceQABenchmark`, `PopeBenchmark`, ...): it supplies `questions()`, `score(answers)` and
`image_folder`; its `limit` keeps it small.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from PIL import Image

from llava_lit.eval.report import flatten
from llava_lit.qa_files import Question

log = logging.getLogger(__name__)

GenerateFn = Callable[[pl.LightningModule, list[Question], str], list[str]]
"""`(module, questions, image_folder) -> one answer per question`, greedy, in the order given."""


def generate_with_predict(
    module: pl.LightningModule, questions: list[Question], image_folder: str
) -> list[str]:
    """Answer in memory with the project's batched prediction code (the single call site used in training)."""
    from llava_lit.predict import generate_answers  # predict imports the model stack; only needed here

    return generate_answers(module, questions, image_folder)


class SampleAnswersCallback(pl.Callback):
    """Log sample answers as a W&B table and a small benchmark's metrics at each validation."""

    def __init__(
        self,
        benchmark: Any,
        references: dict[str, str] | None = None,
        num_questions: int = 16,
        key: str = "samples",
        generate: GenerateFn = generate_with_predict,
    ) -> None:
        """
        Args:
            benchmark: an eval benchmark object (`questions()`, `score(answers)`, `image_folder`).
            references: question id -> reference answer shown in the table; defaults to the benchmark's
                `reference(question_id)` when it has one, else "".
            num_questions: how many of the benchmark's questions (its first ones) to ask every validation.
            key: prefix of the logged table and metric names.
            generate: how to answer; the default runs the project's batched prediction on the module.
        """
        super().__init__()
        self.benchmark = benchmark
        self.questions = benchmark.questions()[:num_questions]
        if not self.questions:
            raise ValueError("the sample benchmark has no questions")
        self.references = references or {}
        self.key = key
        self.generate = generate

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        answers = self.generate(pl_module, self.questions, self.benchmark.image_folder)
        if len(answers) != len(self.questions):
            raise RuntimeError(
                f"generate returned {len(answers)} answers for {len(self.questions)} questions"
            )
        by_id = {q.question_id: a for q, a in zip(self.questions, answers, strict=True)}
        metrics = self.benchmark.score(by_id)
        pl_module.log_dict(flatten(metrics, self.key), rank_zero_only=True)
        if trainer.is_global_zero:
            self._log_table(trainer, answers)

    def _reference(self, question: Question) -> str:
        if question.question_id in self.references:
            return self.references[question.question_id]
        reference = getattr(self.benchmark, "reference", None)
        return reference(question.question_id) if reference else ""

    def _log_table(self, trainer: pl.Trainer, answers: list[str]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb  # only with a WandbLogger attached, which already imported it

        rows, images, captions = [], [], []
        for q, answer in zip(self.questions, answers, strict=True):
            image = None
            if q.image is not None:
                with Image.open(Path(self.benchmark.image_folder) / q.image) as img:
                    image = img.convert("RGB")
                images.append(image)
                captions.append(f"{q.question_id}: {answer}")
            rows.append(
                [q.question_id, wandb.Image(image) if image else None, q.text, answer, self._reference(q)]
            )
        columns = ["question_id", "image", "prompt", "answer", "reference"]
        for lg in loggers:
            lg.log_table(key=f"{self.key}/answers", columns=columns, data=rows, step=trainer.global_step)
            # A run-logged table keeps its images in a table artifact, not among the run's files; logging them
            # once more as plain media keeps them visible in offline run folders too.
            if images:
                lg.log_image(
                    key=f"{self.key}/images", images=images, caption=captions, step=trainer.global_step
                )
