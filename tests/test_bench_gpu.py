"""`benchmarks/bench_gpu.py --tiny`: every eager setting of both stages trains and reports throughput."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_setting(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", f"--json={out}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["stage"], r["setting"]) for r in rows} == {
        (stage, setting)
        for stage in ("align", "finetune")
        for setting in ("eager", "eager+fused", "eager+ckpt", "eager+ckpt+fused", "eager+packed")
    }
    for row in rows:
        assert row["status"] == "ok", row
        assert row["packing"] == ("packed" if row["setting"].endswith("+packed") else "padded")
        assert row["tokens_per_s"] > 0 and row["samples_per_s"] > 0 and row["tflops_per_s"] > 0
        assert row["mfu"] is None  # no peak on the CPU unless --peak-tflops is given
    assert "TFLOP/s" in proc.stdout and "eager+ckpt+fused" in proc.stdout
