"""`python -m llava_lit.world.demo [overrides]`: the main job (`make demo`), build → align → finetune → evaluate.

It runs the three commands of the miniature world's recipe, each as its own process with the given overrides,

    python -m llava_lit.train stage=align            # builds the world on first use
    python -m llava_lit.train stage=finetune
    python -m llava_lit.world.evaluate

with one change on the CPU: the evaluation's no-stage-1 ablation (a second finetune, from a fresh projector) trains
beside the finetune, each on half the cores, instead of inside `evaluate` after it. The tiny model uses a second
core poorly: eager, the two took 760 s side by side against 442 s + 522 s one after the other; with the decoder
layers compiled, two 1-thread finetunes ran at 88 + 74 samples/s against 107 for one on 2 threads
(docs/benchmarks.md). On other accelerators the steps run one
after the other. The finetune prints to the console, the ablation to
`<output_root>/<run_name>_no_stage1/finetune/console.log`. A failed step stops the demo with its exit code; the
wall time of each step is printed at the end.

A SIGTERM, SIGUSR1 or SIGUSR2 sent to the demo is passed on to the steps running, which save a checkpoint at
their next optimizer step and stop (`llava_lit.preemption`); the demo then stops too, and
`python -m llava_lit.world.demo ckpt_path=last` continues each training step from its last checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from llava_lit.hydra_app import hydra_app
from llava_lit.world.build import load_world_info
from llava_lit.world.evaluate import compose_train, no_stage1_dir, no_stage1_overrides, override_key

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""Signals the demo passes on to its running steps (a terminal's Ctrl-C already reaches them directly)."""

_running: list[subprocess.Popen] = []
_forwarded: list[int] = []


def _forward(signum: int, frame: object) -> None:
    _forwarded.append(signum)
    for child in _running:
        if child.poll() is None:
            child.send_signal(signum)


def _start(command: list[str], **kwargs: object) -> subprocess.Popen:
    """Start a step whose signals the demo forwards."""
    child = subprocess.Popen(command, **kwargs)  # type: ignore[call-overload]
    _running.append(child)
    return child


def _call(command: list[str]) -> int:
    """Run a step to its end and return its exit code."""
    return _start(command).wait()


def _train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "llava_lit.train", *overrides]


def _check(returncode: int, what: str) -> None:
    if returncode == 0:
        return
    if returncode > 128 and returncode - 128 in {int(s) for s in FORWARDED_SIGNALS}:
        name = signal.Signals(returncode - 128).name
        raise SystemExit(
            f"demo: {what} stopped on {name} after saving a checkpoint (exit code {returncode}); "
            "`python -m llava_lit.world.demo ckpt_path=last` (with the same overrides) continues from it"
        )
    raise SystemExit(f"demo: {what} failed (exit code {returncode})")


def side_by_side_threads(cfg_accelerator: str, overrides: list[str], cores: int | None = None) -> int | None:
    """Torch threads of each of the two finetunes trained side by side, or None to run them one after the other.

    Side by side only on the CPU, with at least 2 cores and no `cpu_threads` or `evaluate.no_align` given.
    """
    cores = cores or len(os.sched_getaffinity(0))
    given = {override_key(o) for o in overrides}
    if cfg_accelerator != "cpu" or cores < 2 or given & {"cpu_threads", "evaluate.no_align"}:
        return None
    return cores // 2


def run(overrides: list[str]) -> dict[str, float]:
    """Run the demo with `overrides` (the `key=value` overrides of `python -m llava_lit.train`); returns step times."""
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward)
    cfg = compose_train(overrides)
    times: dict[str, float] = {}
    start, started_at = time.perf_counter(), time.time()

    _check(_call(_train_command(["stage=align", *overrides])), "stage=align")
    times["align"] = time.perf_counter() - start
    world_json = Path(cfg.paths.world_dir) / "world.json"
    if world_json.is_file() and world_json.stat().st_mtime > started_at:  # built by this align run
        times["world build (in align)"] = load_world_info(world_json.parent)["timings_s"]["total"]

    threads = side_by_side_threads(cfg.trainer.accelerator, overrides)
    step_start = time.perf_counter()
    if threads is None:
        _check(_call(_train_command(["stage=finetune", *overrides])), "stage=finetune")
        times["finetune"] = time.perf_counter() - step_start
        evaluate_overrides = overrides
    else:
        ablation = no_stage1_overrides(overrides, cfg.run_name)
        log_dir = no_stage1_dir(cfg)
        log_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"demo: finetune and its no-stage-1 ablation train side by side, {threads} thread(s) each; "
            f"the ablation logs to {log_dir / 'console.log'}",
            flush=True,
        )
        with open(log_dir / "console.log", "w") as log:
            side = _start(
                _train_command([*ablation, f"cpu_threads={threads}"]), stdout=log, stderr=subprocess.STDOUT
            )
            try:
                finetune = _call(_train_command(["stage=finetune", *overrides, f"cpu_threads={threads}"]))
            except BaseException:
                side.kill()
                raise
            if finetune != 0 and not _forwarded:
                side.kill()  # a forwarded signal lets it save its checkpoint and stop by itself
            _check(finetune, "stage=finetune")
            _check(side.wait(), f"the no-stage-1 finetune (see {log_dir / 'console.log'})")
        times["finetune beside no-stage-1 finetune"] = time.perf_counter() - step_start
        evaluate_overrides = [*overrides, "evaluate.no_align=trained"]

    step_start = time.perf_counter()
    _check(_call([sys.executable, "-m", "llava_lit.world.evaluate", *evaluate_overrides]), "evaluate")
    times["evaluate"] = time.perf_counter() - step_start
    times["total"] = time.perf_counter() - start
    print("demo wall time: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in times.items()), flush=True)
    return times


@hydra_app("world_app")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (`conf/world_app.yaml`): the same `key=value` overrides as `python -m llava_lit.train`."""
    run(list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
