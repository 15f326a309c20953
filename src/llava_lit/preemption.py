"""Preemption: a scheduler's signal becomes a checkpoint at the next optimizer-step boundary, then an exit.

Clusters stop jobs with a signal and a grace period: SLURM sends SIGTERM on preemption, `scancel` and at the
time limit (then SIGKILL after `KillWait`), and the signal named by `sbatch --signal=USR1@120` (submitit uses
SIGUSR2) some time before the limit; Kubernetes sends SIGTERM. `PreemptionCheckpoint` turns any of them into:

1. the handler only records the signal (nothing else is safe inside a signal handler);
2. at the end of the current optimizer step (never inside gradient accumulation), all ranks agree whether any
   rank received a signal (one all-reduce of one integer per optimizer step when there are several ranks), and
   then every rank takes part in saving `last.ckpt` through the strategy (collective under FSDP2);
3. Lightning stops the run as it does on SIGTERM (`SIGTERMException`, after the step's metrics are logged),
   and `train` turns that into `Preempted`, a `SystemExit` with status 128 + the signal number (143 for
   SIGTERM), so a scheduler, a shell script or `python -m llava_lit.world.demo` sees a failed step, never a
   finished one (Lightning alone would exit with status 0 and no checkpoint);
4. for the notice signals (SIGUSR1, SIGUSR2) in a SLURM job, the job is requeued first: by the handler that was
   in place before training (submitit's, which requeues and exits), or by `scontrol requeue` from rank 0.
   SIGTERM is not requeued: it is also what `scancel` sends.

A requeued job resumes from that checkpoint by itself (`checkpointing.resume_path`). DataLoader workers ignore
these signals (`datamodule._WorkerInit`), so a signal sent to the whole process group does not kill them before
the main process has saved. A signal that arrives before training starts (while models load) takes its
default action: the process ends, and there is nothing new to save.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from llava_lit.checkpointing import at_step_boundary, last_checkpoint_path

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
"""The signals schedulers send before they stop a job."""

NOTICE_SIGNALS = ("SIGUSR1", "SIGUSR2")
"""Signals that announce a time limit or a preemption (sent on purpose by the scheduler): these requeue."""


class Preempted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint


class PreemptionCheckpoint(L.Callback):
    """Saves `last.ckpt` at the next optimizer-step boundary after a preemption signal, then stops the run.

    Args:
        signals: names of the signals to handle (`SIGTERM`, `SIGUSR1`, `SIGUSR2`, ...).
        requeue: in a SLURM job, requeue it after the checkpoint when the signal is a notice signal (SIGUSR1,
            SIGUSR2); the requeued job resumes from the checkpoint by itself.
    """

    def __init__(self, signals: Sequence[str] = DEFAULT_SIGNALS, requeue: bool = True) -> None:
        unknown = [
            name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)
        ]
        if unknown:
            raise ValueError(f"unknown signal names {unknown}")
        self.signals = tuple(getattr(signal, name) for name in signals)
        self.requeue = requeue
        self.received: int | None = None
        """The first signal received since training started (set by the handler)."""
        self.stopped: tuple[int, Path] | None = None
        """(signal, checkpoint) once the run saved and is stopping."""
        self._outer: dict[int, Any] = {}

    # -- signal handling ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning installs its own handlers (at the start of fit): the handlers of whoever launched us
        # (submitit's requeueing handler, say), to chain to after the checkpoint.
        self._outer = {sig: signal.getsignal(sig) for sig in self.signals}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = self.stopped = None
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: preemption signals are not handled")
            return
        # Replaces Lightning's SIGTERM handler too, which would stop the run with status 0 and no checkpoint.
        for sig in self.signals:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            os.write(
                2,
                f"llava_lit: received {signal.Signals(signum).name}: checkpoint at the next step\n".encode(),
            )

    # -- the step boundary -------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.stopped is not None or not at_step_boundary(trainer, batch_idx):
            return
        signum = self.received or 0
        if trainer.world_size > 1:  # any rank's signal stops every rank, at the same step
            flag = torch.tensor(signum, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max"))
        if not signum:
            return
        path = last_checkpoint_path(trainer)
        name = signal.Signals(signum).name
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning(
                "%s: checkpoint of step %d saved to %s; stopping with exit status %d. Resume with ckpt_path=last "
                "(the same run_name) or ckpt_path=%s",
                name,
                trainer.global_step,
                path,
                128 + signum,
                path,
            )
        self.stopped = (signum, path)
        # Lightning then stops the way it stops on SIGTERM (SIGTERMException), once this step's metrics are
        # logged; `train` turns that into `Preempted`.
        trainer._signal_connector.received_sigterm = True

    def requeue_if_asked(self, trainer: L.Trainer) -> None:
        """After a stop on a notice signal in a SLURM job: requeue it (see the module docstring)."""
        if self.stopped is None or not self.requeue:
            return
        signum = self.stopped[0]
        if signal.Signals(signum).name not in NOTICE_SIGNALS:
            return
        outer = self._outer.get(signum)
        if callable(outer):
            outer(signum, None)  # e.g. submitit's: checkpoints its submission, requeues, exits on rank 0
        elif trainer.is_global_zero and slurm_job_id() is not None:
            requeue_slurm_job()


def preempted(trainer: L.Trainer) -> Preempted:
    """The `Preempted` exit for a run that Lightning stopped with `SIGTERMException`, after requeueing the job
    when the preemption callback stopped it on a notice signal."""
    for callback in trainer.callbacks:
        if isinstance(callback, PreemptionCheckpoint) and callback.stopped is not None:
            callback.requeue_if_asked(trainer)
            return Preempted(*callback.stopped)
    return Preempted(signal.SIGTERM, None)  # Lightning's own SIGTERM handling, without a checkpoint


def slurm_job_id() -> str | None:
    """This SLURM job's id (`<array job>_<task>` for an array task), or None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> bool:
    """`scontrol requeue <this job>`; returns whether SLURM accepted it (a failure is logged, not raised)."""
    job = slurm_job_id()
    if job is None or not re.fullmatch(r"[0-9_]+", job):
        log.warning("not requeued: no valid SLURM job id (%r)", job)
        return False
    try:
        result = run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("requeueing SLURM job %s failed: %s", job, err)
        return False
    if result.returncode != 0:
        log.warning("requeueing SLURM job %s failed: %s", job, (result.stderr or result.stdout).strip())
        return False
    log.warning("requeued SLURM job %s: it resumes from its last checkpoint when it restarts", job)
    return True
