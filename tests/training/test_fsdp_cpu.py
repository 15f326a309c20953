"""The FSDP2 code path of `trainer=fsdp_8gpu`, run as 2 CPU processes (gloo): train, save, resume.

Each run is its own `python -m llava_lit.train` process tree (Lightning launches the second rank), never inside
the pytest worker: distributed state must not leak between tests.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


def _run(overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llava_lit.train", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_train_save_and_resume(train_overrides, tmp_path):
    base = train_overrides(tmp_path / "outputs", "finetune")
    base += ["trainer=fsdp_cpu", "init_projector=null", "trainer.limit_val_batches=0"]
    base += ["module.compile_blocks=true"]  # as the default config: each sharded decoder layer compiled
    # 32 samples / (micro-batch 4 x 2 ranks) = 4 batches per rank and epoch, one per optimizer step.
    first = _run([*base, "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    out = tmp_path / "outputs" / "world" / "finetune"
    ckpt = out / "checkpoints" / "step000002.ckpt"
    assert ckpt.is_dir() and list(ckpt.glob("*.distcp")), "expected a sharded (distributed) checkpoint"
    projector = load_file(str(out / "checkpoints" / "projector.safetensors"))
    assert set(projector) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    second = _run([*base, "trainer.max_steps=4", f"ckpt_path={ckpt}"], tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    with open(out / "csv" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps and max(steps) == 3  # steps 2 and 3 (0-based) ran after the resume
