"""Running `python -m llava_lit.train` as a real process tree, interrupting it, and comparing what runs left.

Each run is its own process group (so a kill reaches every rank and data worker, as a scheduler's would), and
logs every step's metrics to `csv/metrics.csv` at once, which is how a test knows how far a run has got.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LIVE_METRICS = "+logger.csv.flush_logs_every_n_steps=1"
"""Override that writes metrics.csv after every step (Lightning's default waits 100 steps)."""


def start_train(
    overrides: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start a training run in its own process group (with `env` added to the environment); its output goes to
    `log`."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    flags = [o for o in overrides if o.startswith("-")]  # e.g. -m, which Hydra wants before the overrides
    settings = [o for o in overrides if not o.startswith("-")]
    handle = open(log, "w")  # noqa: SIM115 - closed by finish()
    process = subprocess.Popen(
        [sys.executable, "-m", "llava_lit.train", *flags, LIVE_METRICS, *settings],
        cwd=cwd,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    process.log_handle = handle  # type: ignore[attr-defined]
    process.log_path = log  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for the run; returns its exit status and output."""
    try:
        returncode = process.wait(timeout=timeout)
    finally:
        process.log_handle.close()  # type: ignore[attr-defined]
    return returncode, Path(process.log_path).read_text()  # type: ignore[attr-defined]


def train(
    overrides: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    """Run to the end; returns the output, asserting success."""
    returncode, output = finish(start_train(overrides, cwd, log, env), timeout)
    assert returncode == 0, output[-4000:]
    return output


def logged_steps(run_dir: Path) -> int:
    """The highest optimizer step with a logged training loss so far (-1 before the first)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return -1
    with open(path, newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    return max(steps, default=-1)


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> int:
    """Block until the run has logged `step` (returns the step reached); fails if it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = logged_steps(run_dir)
        if reached >= step:
            return reached
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended before step {step}:\n{Path(process.log_path).read_text()[-4000:]}"
            )
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Send `signum` to every process of the run (ranks and data workers), as a scheduler does."""
    os.killpg(process.pid, signum)


def losses(run_dir: Path) -> list[tuple[int, str]]:
    """Every logged (step, training loss) row, in order."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [
            (int(row["step"]), row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")
        ]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file, or an FSDP2 checkpoint folder converted to one, as nested dicts of tensors."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/whole.pt")
        state = torch.load(f"{tmp}/whole.pt", map_location="cpu", weights_only=True)
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    return {**meta, **state}


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bitwise-equal weights and optimizer states, and the same step."""
    assert a["global_step"] == b["global_step"]
    _assert_equal(a["state_dict"], b["state_dict"], "state_dict")
    optimizers = [k for k in a if k.startswith("optimizer")]
    assert optimizers and optimizers == [k for k in b if k.startswith("optimizer")]
    for key in optimizers:
        _assert_equal(a[key], b[key], key)


def _assert_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1, "SIGKILL": signal.SIGKILL}
