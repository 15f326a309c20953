"""`CSVLogger`: Lightning's CSV logger whose `metrics.csv` keeps the history of a resumed run.

Lightning's writer deletes an existing `metrics.csv` when it starts. Here the existing rows are read instead;
a run that resumes from a checkpoint of step N keeps the rows of steps before N (the resumed run logs step N
onwards again), and a fresh run replaces the file as Lightning's does. `LlavaLitModule.on_load_checkpoint` tells
the loggers the resumed step.
"""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from llava_lit.atomic_files import atomic_file


class _KeepingWriter(ExperimentWriter):
    """An `ExperimentWriter` that reads an existing metrics file instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self.previous_rows: list[dict[str, str]] = []
        self.kept_rows: list[dict[str, str]] = []
        self._started = False
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.previous_rows = list(csv.DictReader(handle))

    def keep_before(self, step: int) -> None:
        """Keep the previous rows logged before `step` (the step a resumed run continues from)."""
        self.kept_rows = [row for row in self.previous_rows if _step(row) < step]

    def save(self) -> None:
        if not self._started and self.metrics:
            # The first save of this run rewrites the file: the kept history (none for a fresh run), then ours.
            self._started = True
            self._record_new_keys()
            for row in self.kept_rows:
                for key in row:
                    if key not in self.metrics_keys:
                        self.metrics_keys.append(key)
            self.metrics_keys.sort()
            with atomic_file(self.metrics_file_path, "w") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(self.kept_rows)
                writer.writerows(self.metrics)
            self.metrics = []
            return
        super().save()


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class CSVLogger(LightningCSVLogger):
    """Lightning's `CSVLogger` that keeps the metric history of the steps before a resume (see the module)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def resume_from_step(self, step: int) -> None:
        """Keep the rows of the previous run logged before `step`."""
        writer = self.experiment
        if isinstance(writer, _KeepingWriter):  # rank 0 only: other ranks get a dummy experiment
            writer.keep_before(step)
