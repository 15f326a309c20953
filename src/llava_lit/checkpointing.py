"""Checkpoints that survive failures: atomic writes, saves only between optimizer steps, and where to resume.

- `AtomicCheckpointIO` writes a checkpoint file beside its target and renames it into place (`atomic_files`), so
  a save that fails (full disk, kill -9) leaves the previous checkpoint loadable; the error says so. Loading is
  `weights_only`: a checkpoint holds tensors and plain data, never pickled code.
- `AtomicModelParallelStrategy` does the same for FSDP2's sharded checkpoint folders: every rank writes into a
  temporary sibling folder, which rank 0 swaps in once all shards are on disk.
- `StepCheckpoint` is Lightning's `ModelCheckpoint` that also saves every `every_n_minutes` of training, and
  never in the middle of gradient accumulation (the accumulated gradients are not part of a checkpoint, so a
  save there could not resume exactly).
- `resume_path` turns the `ckpt_path` setting into the checkpoint to resume from (`last`, a path, or the
  run's last checkpoint when SLURM restarted the job).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.api import CheckpointException

from llava_lit.atomic_files import atomic_file, fsync_tree, recover_interrupted_swap, replace_path

log = logging.getLogger(__name__)

LAST = "last.ckpt"
"""The name of a run's most recent checkpoint inside its `checkpoints/` folder."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous checkpoint at the same path is intact."""


def _save_failed(path: Path, err: BaseException) -> CheckpointSaveError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free on its filesystem now"
    except OSError:
        free = "free space unknown"
    return CheckpointSaveError(
        f"saving the checkpoint {path} failed ({_cause(err)}; {free}); the previous checkpoint there, if any, "
        "is intact. Free disk space (or fix the error) and resume with ckpt_path=last"
    )


def _cause(err: BaseException) -> str:
    """The error behind a failed save, in one line: torch.save's zip writer reports a failed write as a
    RuntimeError with the OSError as context, and a distributed save gathers each rank's failure into a
    `CheckpointException` (without that context, once it crossed ranks)."""
    pending: list[BaseException] = [err]
    first = err
    while pending:
        current = pending.pop()
        if isinstance(current, OSError):
            return str(current)
        if isinstance(current, CheckpointException):
            failures = [f[0] if isinstance(f, tuple) else f for f in current.failures.values()]
            first = failures[0] if failures else current
            pending += failures
        pending += [linked for linked in (current.__cause__, current.__context__) if linked is not None]
    return f"{type(first).__name__}: {first}".splitlines()[0]


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes atomically and loads tensors and plain data only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        try:
            with atomic_file(path) as handle:
                torch.save(checkpoint, handle)
        except (OSError, RuntimeError) as err:
            raise _save_failed(path, err) from err

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("checkpoints are loaded with weights_only=True: they hold no code")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy whose sharded checkpoint folders appear complete or not at all.

    All ranks write their shards (and rank 0 the metadata) into `.<name>.tmp` beside the target; after a
    barrier rank 0 flushes the folder to disk and swaps it in (`atomic_files.replace_path`). A failed save on
    any rank fails the collective save on every rank, removes the temporary and keeps the previous folder.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(filepath))
        temp = path.with_name(f".{path.name}.tmp")  # the same name on every rank
        if self.is_global_zero:
            recover_interrupted_swap(path)
            if temp.exists():
                shutil.rmtree(temp)
        self.barrier("checkpoint_tmp_ready")
        try:
            super().save_checkpoint(checkpoint, temp, storage_options)
        except (Exception, CheckpointException) as err:  # DCP's collective failure is a BaseException
            if self.is_global_zero:
                shutil.rmtree(temp, ignore_errors=True)
            raise _save_failed(path, err) from err
        self.barrier("checkpoint_written")
        if self.is_global_zero:
            try:
                fsync_tree(temp)
                replace_path(temp, path)
            except OSError as err:
                shutil.rmtree(temp, ignore_errors=True)
                raise _save_failed(path, err) from err
        self.barrier("checkpoint_swapped")


def at_step_boundary(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch `batch_idx` just finished an optimizer step (not in the middle of accumulation)."""
    accumulated = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return accumulated or bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` with a time-based save that lands only on optimizer-step boundaries.

    Args:
        every_n_minutes: also save (the top-k file and `last.ckpt`) when this many minutes of training have
            passed since the previous save; rank 0's clock decides for all ranks. None disables it. It adds to
            `every_n_train_steps` and the end-of-epoch save rather than replacing them.
        **kwargs: `ModelCheckpoint`'s arguments.
    """

    def __init__(self, *, every_n_minutes: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if every_n_minutes is not None:
            if every_n_minutes <= 0:
                raise ValueError(f"every_n_minutes must be positive, got {every_n_minutes}")
            # Set after __init__: ModelCheckpoint refuses a time interval together with a step interval and
            # would turn the end-of-epoch save off, while both are wanted here.
            self._train_time_interval = datetime.timedelta(minutes=every_n_minutes)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not at_step_boundary(trainer, batch_idx):
            return  # the timer keeps running; the save happens at the end of this optimizer step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the run's `last.ckpt` goes: in the ModelCheckpoint's folder (what `ckpt_path=last` finds), else in
    `<default_root_dir>/checkpoints`."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / LAST
    return Path(trainer.default_root_dir) / "checkpoints" / LAST


def last_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The `last.ckpt` file or folder in `checkpoint_dir` (restoring one left aside by an interrupted swap)."""
    path = Path(checkpoint_dir) / LAST
    recover_interrupted_swap(path)
    return path if path.exists() else None


def resume_path(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint a run resumes from.

    - a path: that checkpoint (it must exist);
    - `last`: the run's `last.ckpt` in `checkpoint_dir`, or a fresh start when there is none yet;
    - None: a fresh start, except in a SLURM job that SLURM restarted (`SLURM_RESTART_COUNT` > 0, i.e. a
      requeued job), which resumes from its last checkpoint as `last` would.
    """
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if ckpt_path is None and restarts > 0:
        log.info("SLURM restarted this job (restart %d): resuming from its last checkpoint", restarts)
        ckpt_path = "last"
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        found = last_checkpoint(checkpoint_dir)
        if found is None:
            log.info("ckpt_path=last: no checkpoint in %s yet, starting from the beginning", checkpoint_dir)
            return None
        log.info("resuming from %s", found)
        return str(found)
    path = Path(ckpt_path)
    recover_interrupted_swap(path)
    if not path.exists():
        raise SystemExit(f"ckpt_path={ckpt_path} does not exist")
    return str(path)
