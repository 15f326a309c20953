"""Kills and preemptions of real training runs, and the exact resume after them.

Each scenario runs `python -m llava_lit.train` as a process tree, interrupts it at a step drawn at random
(seeded, so a failure reproduces), resumes with `ckpt_path=last`, and compares the result with an
uninterrupted run of the same length: bitwise-equal weights and optimizer states, the same loss at every step.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from train_runs import (
    assert_same_training_state,
    finish,
    losses,
    read_checkpoint,
    signal_group,
    start_train,
    train,
    wait_for_step,
)

STEPS = 40
"""Optimizer steps of each single-process run (32 samples, 2 micro-batches of 4 per step: 4 steps per epoch)."""


def _single(train_overrides, out: Path, *extra: str) -> list[str]:
    return [
        *train_overrides(out, "finetune"),
        "init_projector=null",
        "trainer.limit_val_batches=0",
        "data.num_workers=2",  # the signal reaches the data workers too; they must not die of it
        "data.cache_samples=false",
        f"trainer.max_steps={STEPS}",
        "epochs.finetune=1000",  # max_steps ends the run
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(train_overrides, tmp_path_factory) -> Path:
    """The reference: the same run from start to end without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    train(_single(train_overrides, root / "outputs"), root, root / "train.log")
    return root / "outputs" / "world" / "finetune"


def _recording_scontrol(folder: Path) -> Path:
    """An `scontrol` that records its arguments: this machine has no SLURM to requeue a job."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls"}\n')
    script.chmod(0o755)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_at_the_next_step_boundary_then_the_run_resumes_exactly(
    signum, uninterrupted, train_overrides, tmp_path
):
    """SIGTERM (kill, scancel, Kubernetes): checkpoint and exit 143; resumed with ckpt_path=last. SIGUSR1 in a
    SLURM job (`sbatch --signal=USR1@120`): checkpoint, `scontrol requeue`, exit 138; the restarted job
    (SLURM_RESTART_COUNT=1) resumes with no ckpt_path given."""
    out = tmp_path / "outputs"
    run_dir = out / "world" / "finetune"
    slurm = signum == signal.SIGUSR1
    bin_dir = _recording_scontrol(tmp_path / "bin")
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"} if slurm else {}
    at = random.Random(f"signal-{signum}").randint(3, STEPS // 2)
    process = start_train(_single(train_overrides, out), tmp_path, tmp_path / "first.log", env)
    wait_for_step(process, run_dir, at)
    signal_group(process, signum)
    returncode, output = finish(process)
    assert returncode == 128 + signum, output[-4000:]
    assert f"{signal.Signals(signum).name}: checkpoint of step" in output
    stopped = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert at <= stopped["global_step"] < STEPS  # a whole optimizer step, before the end
    # The preempted stage wrote no projector handoff: finetune never starts from a half-trained one.
    assert not (run_dir / "checkpoints" / "projector.safetensors").exists()
    requeues = (bin_dir / "calls").read_text().split("\n") if (bin_dir / "calls").exists() else []
    assert requeues == (["requeue 4242", ""] if slurm else [])  # scancel's SIGTERM never requeues

    if slurm:  # what SLURM runs again after the requeue: the same command, in a restarted job
        resumed = train(
            _single(train_overrides, out), tmp_path, tmp_path / "second.log", {"SLURM_RESTART_COUNT": "1"}
        )
    else:
        resumed = train([*_single(train_overrides, out), "ckpt_path=last"], tmp_path, tmp_path / "second.log")
    assert "resuming from" in resumed
    assert_same_training_state(
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt"),
        read_checkpoint(uninterrupted / "checkpoints" / "last.ckpt"),
    )
    # metrics.csv keeps the history from before the resume: every step logged once, as uninterrupted.
    assert losses(run_dir) == losses(uninterrupted)


FSDP_STEPS = 10
"""Optimizer steps of each FSDP2 run (32 samples over 2 ranks x micro-batch 4: 4 steps per epoch)."""


def _fsdp(train_overrides, out: Path, *extra: str) -> list[str]:
    return [
        *train_overrides(out, "finetune"),
        "trainer=fsdp_cpu",
        "init_projector=null",
        "trainer.limit_val_batches=0",
        f"trainer.max_steps={FSDP_STEPS}",
        "epochs.finetune=1000",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted_fsdp(train_overrides, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted_fsdp")
    train(_fsdp(train_overrides, root / "outputs"), root, root / "train.log")
    return root / "outputs" / "world" / "finetune"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9 every rank", "SIGTERM to rank 0 only"])
def test_fsdp2_interrupted_at_a_random_step_resumes_exactly(
    how, uninterrupted_fsdp, train_overrides, tmp_path
):
    out = tmp_path / "outputs"
    run_dir = out / "world" / "finetune"
    at = random.Random(how).randint(2, FSDP_STEPS - 3)
    process = start_train(_fsdp(train_overrides, out), tmp_path, tmp_path / "first.log")
    wait_for_step(process, run_dir, at)
    if how.startswith("kill"):
        signal_group(process, signal.SIGKILL)  # no warning, possibly in the middle of a checkpoint save
        returncode, output = finish(process)
        assert returncode == -signal.SIGKILL
    else:
        process.send_signal(signal.SIGTERM)  # rank 1 learns it from rank 0 at the step boundary
        returncode, output = finish(process)
        assert returncode == 128 + signal.SIGTERM, output[-4000:]
        assert "SIGTERM: checkpoint of step" in output
    stopped = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # complete, even if killed mid-save
    assert at - 1 <= stopped["global_step"] < FSDP_STEPS

    resumed = train([*_fsdp(train_overrides, out), "ckpt_path=last"], tmp_path, tmp_path / "second.log")
    assert "resuming from" in resumed
    assert_same_training_state(
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt"),
        read_checkpoint(uninterrupted_fsdp / "checkpoints" / "last.ckpt"),
    )
    assert losses(run_dir) == losses(uninterrupted_fsdp)


def _submitit_task(folder: Path) -> int | None:
    """The pid of the job process that submitit's local executor started for a job in `folder`, if running."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in cmdline]
        if "submitit.core._submit" in words and any(str(folder) in w for w in words):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_submitit_job_requeues_on_its_notice_signal_and_resumes_by_itself(
    uninterrupted, train_overrides, tmp_path
):
    """`launcher=local` is submitit's local executor, the same path as `launcher=slurm` on a cluster: SIGUSR2
    (submitit's notice before a time limit or preemption) saves, requeues the job, and the requeued job resumes
    from last.ckpt on its own, ending where an uninterrupted run ends."""
    out = tmp_path / "outputs"
    run_dir = out / "world" / "finetune"
    process = start_train(
        ["-m", "launcher=local", *_single(train_overrides, out)], tmp_path, tmp_path / "hydra.log"
    )
    wait_for_step(process, run_dir, random.Random("submitit").randint(3, STEPS // 2))
    task = _submitit_task(out)
    assert task is not None, "no submitit job process found"
    os.kill(task, signal.SIGUSR2)
    returncode, output = finish(process)
    logs = "\n".join(p.read_text() for p in sorted((out / ".submitit").rglob("*_log.*")))
    assert returncode == 0, output[-3000:] + logs[-4000:]
    assert "SIGUSR2: checkpoint of step" in logs and "resuming from" in logs, logs[-4000:]
    assert_same_training_state(
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt"),
        read_checkpoint(uninterrupted / "checkpoints" / "last.ckpt"),
    )
    assert losses(run_dir) == losses(uninterrupted)
