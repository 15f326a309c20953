"""`python -m llava_lit.world.demo`: the main job's three steps, with the no-stage-1 ablation trained beside the
finetune on the CPU, and the evaluation that takes that ablation instead of training it again."""

from __future__ import annotations

import json
import os

import pytest

from llava_lit.world import demo
from llava_lit.world import evaluate as world_evaluate


def test_side_by_side_only_on_the_cpu_with_cores_to_split():
    assert demo.side_by_side_threads("cpu", [], cores=2) == 1
    assert demo.side_by_side_threads("cpu", ["seed=1"], cores=16) == 8
    assert demo.side_by_side_threads("cpu", [], cores=1) is None
    assert demo.side_by_side_threads("gpu", [], cores=16) is None
    # The user's own thread count, or an evaluation without (or with an already trained) ablation, wins.
    assert demo.side_by_side_threads("cpu", ["cpu_threads=2"], cores=2) is None
    assert demo.side_by_side_threads("cpu", ["evaluate.no_align=false"], cores=2) is None


def test_no_stage1_overrides_keep_everything_but_stage_run_and_projector():
    given = ["seed=3", "stage=align", "run_name=mine", "init_projector=/p.safetensors", "+world.seed=2"]
    assert world_evaluate.no_stage1_overrides(given, "mine") == [
        "seed=3",
        "+world.seed=2",
        "stage=finetune",
        "init_projector=null",
        "run_name=mine_no_stage1",
    ]


def test_evaluate_checks_the_ablation_setting_before_predicting(tmp_path):
    finetuned = tmp_path / "out" / "world" / "finetune" / "checkpoints"
    finetuned.mkdir(parents=True)
    (finetuned / "last.ckpt").write_bytes(b"")  # never loaded: both calls stop before predicting
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text(json.dumps({"config": {}}))
    overrides = [f"paths.world_dir={tmp_path / 'world'}", f"paths.output_root={tmp_path / 'out'}"]
    with pytest.raises(SystemExit, match="use true"):
        world_evaluate.run([*overrides, "evaluate.no_align=maybe"])
    with pytest.raises(SystemExit, match="no no-stage-1 checkpoint .* run_name=world_no_stage1"):
        world_evaluate.run([*overrides, "evaluate.no_align=trained"])


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="side by side needs 2 cores")
def test_demo_runs_every_step_with_the_ablation_beside_the_finetune(tmp_path, capsys):
    overrides = [
        f"paths.world_dir={tmp_path / 'world'}",
        "world.preset=ci",
        f"paths.output_root={tmp_path / 'out'}",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "evaluate.limit=14",
    ]
    times = demo.run(overrides)
    assert set(times) == {
        "align",
        "world build (in align)",
        "finetune beside no-stage-1 finetune",
        "evaluate",
        "total",
    }
    assert "demo wall time: align" in capsys.readouterr().out
    ablation = tmp_path / "out" / "world_no_stage1" / "finetune"
    assert (ablation / "checkpoints" / "last.ckpt").is_file()
    assert "torch threads: 1" in (ablation / "console.log").read_text()
    report = json.loads((tmp_path / "out" / "world" / "world_eval" / "report.json").read_text())
    assert set(report["table"]["overall"]) >= {"llava", "blank image", "no stage 1", "chance"}
    # A second evaluation takes the trained ablation as it is.
    again = world_evaluate.run([*overrides, "evaluate.no_align=trained"])
    assert again["table"]["overall"]["no stage 1"] == report["table"]["overall"]["no stage 1"]


@pytest.mark.slow
def test_a_signal_to_the_demo_reaches_its_step_which_saves_and_the_demo_stops(train_overrides, tmp_path):
    """SIGTERM to `python -m llava_lit.world.demo` (a `kill`, a job's end) reaches the training step it runs,
    which saves a checkpoint and stops; the demo then stops too, saying how to continue, instead of going on
    to the next stage."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "outputs"
    overrides = [
        *[o for o in train_overrides(out, "align") if not o.startswith("stage=")],
        "+logger.csv.flush_logs_every_n_steps=1",
        "trainer.max_steps=200",
        "epochs.align=1000",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    demo_process = subprocess.Popen(
        [sys.executable, "-m", "llava_lit.world.demo", *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = out / "world" / "align" / "csv" / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 3):
        assert time.monotonic() < deadline and demo_process.poll() is None, "align did not get going"
        time.sleep(0.05)
    demo_process.send_signal(signal.SIGTERM)
    output, _ = demo_process.communicate(timeout=300)
    assert demo_process.returncode == 1, output[-3000:]
    assert "stage=align stopped on SIGTERM after saving a checkpoint (exit code 143)" in output
    assert "ckpt_path=last" in output
    assert (out / "world" / "align" / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "world" / "finetune").exists()  # the demo did not go on with a half-trained projector
