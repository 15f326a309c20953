"""A full disk during a save: the previous checkpoint (or export, or projector) stays whole and loadable.

The writes go to a real, small filesystem: a tmpfs mounted in a private mount namespace (`unshare -rm`, no
privileges needed), sized so that the first save fits and the second does not. Everything that must look at
the tmpfs runs inside that namespace; what the test checks afterwards is copied out first.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_runs import LIVE_METRICS, read_checkpoint


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "mkdir -p /tmp/llava_lit_probe && mount -t tmpfs -o size=1m none /tmp/llava_lit_probe"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs")


def on_small_disk(command: str, size_mb: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the shell `command` with `$DISK` a fresh tmpfs of `size_mb` MB; `$DISK` is copied to
    `tmp_path / "disk"` afterwards (the tmpfs vanishes with the namespace)."""
    disk = tmp_path / "mnt"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size={size_mb}m none {disk} && export DISK={disk} && ({command}); "
        f"status=$?; cp -a {disk} {tmp_path / 'disk'}; exit $status"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600
    )


def python(code: str) -> str:
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(textwrap.dedent(code))}"


def test_a_checkpoint_save_that_fills_the_disk_keeps_the_previous_checkpoint(tmp_path):
    code = """
        import json, os, torch
        from llava_lit.checkpointing import AtomicCheckpointIO, CheckpointSaveError
        path = os.path.join(os.environ["DISK"], "last.ckpt")
        io = AtomicCheckpointIO()
        io.save_checkpoint({"w": torch.ones(3_000_000), "global_step": 1}, path)  # 12 MB of 20
        try:
            io.save_checkpoint({"w": torch.zeros(3_000_000), "global_step": 2}, path)
            print(json.dumps({"second": "saved"}))
        except CheckpointSaveError as err:
            print(json.dumps({"second": str(err)}))
    """
    result = on_small_disk(python(code), 20, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    second = json.loads(result.stdout.strip().splitlines()[-1])["second"]
    assert "No space left on device" in second and "is intact" in second
    saved = torch.load(tmp_path / "disk" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1 and torch.equal(saved["w"], torch.ones(3_000_000))
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["last.ckpt"]  # no temporary left behind


def test_a_folder_write_that_fills_the_disk_keeps_the_previous_folder(tmp_path):
    code = """
        import os
        from llava_lit.atomic_files import atomic_directory
        target = os.path.join(os.environ["DISK"], "export")
        with atomic_directory(target) as folder:
            with open(os.path.join(folder, "weights"), "wb") as f:
                f.write(b"1" * 6_000_000)
        try:
            with atomic_directory(target) as folder:
                with open(os.path.join(folder, "weights"), "wb") as f:
                    f.write(b"2" * 6_000_000)
        except OSError as err:
            print("failed:", err.strerror)
    """
    result = on_small_disk(python(code), 10, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed: No space left on device" in result.stdout
    assert (tmp_path / "disk" / "export" / "weights").read_bytes() == b"1" * 6_000_000
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["export"]


def _train_on_disk(overrides: list[str]) -> str:
    """The shell command of a training run whose outputs go to the small disk."""
    args = " ".join(shlex.quote(o) for o in [LIVE_METRICS, *overrides])
    return f'{shlex.quote(sys.executable)} -m llava_lit.train {args} paths.output_root="$DISK/outputs"'


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["cpu", "fsdp_cpu"])
def test_training_that_fills_the_disk_stops_with_the_previous_checkpoint_whole(
    trainer, train_overrides, tmp_path
):
    """Checkpoints every 2 steps onto a disk that holds one save (a step file and last.ckpt) but not a second:
    the run stops at the second save with an error saying the previous checkpoint is intact, and it is."""
    overrides = [
        *train_overrides(tmp_path / "unused", "align"),
        f"trainer={trainer}",
        "trainer.limit_val_batches=0",
        "trainer.max_steps=6",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    overrides = [o for o in overrides if not o.startswith("paths.output_root=")]
    result = on_small_disk(_train_on_disk(overrides), 48, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "CheckpointSaveError" in output and "is intact" in output, output[-4000:]
    assert "MiB free on its filesystem" in output, output[-4000:]
    last = tmp_path / "disk" / "outputs" / "world" / "align" / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)
    assert checkpoint["global_step"] == 2
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")], "a temporary was left behind"
