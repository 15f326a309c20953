"""`python -m llava_lit.world.evaluate`: the proof that the miniature LLaVA learned, with its two ablations.

Run after `stage=align` and `stage=finetune`, with the same overrides (a Hydra app over `conf/world_app.yaml`, which
extends `conf/train.yaml`; it composes each stage's config from the same overrides):

    python -m llava_lit.train stage=align
    python -m llava_lit.train stage=finetune
    python -m llava_lit.world.evaluate

It answers the world's held-out questions (scenes never rendered for training) three ways and prints accuracy per
question type beside chance:
- `llava`: the finetuned model;
- `blank image`: the same model with every image replaced by a blank one (must fall to about chance: the
  answers come from the image, not from the question's wording);
- `no stage 1`: a model finetuned the same way from a fresh projector (shows what alignment buys); trained
  here (`evaluate.no_align=true`), taken from its run folder when trained before (`evaluate.no_align=trained`:
  `python -m llava_lit.world.demo` trains it beside the finetune), or left out (`evaluate.no_align=false`).
A second table splits the `llava` answers by the number of objects in the scene: a type right on one-object
scenes and near 1/n on n-object ones is answered without finding the object the question names. It also plots
the training loss of each stage. Everything lands in `outputs/<run_name>/world_eval/`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from llava_lit.eval.report import Metrics
from llava_lit.eval.run import evaluate
from llava_lit.hydra_app import compose_config, hydra_app
from llava_lit.world.benchmark import WorldBenchmark
from llava_lit.world.build import load_world_info
from llava_lit.world.config import WorldConfig
from llava_lit.world.scenes import blank_image
from llava_lit.world.score import accuracy_by_object_count, load_jsonl

log = logging.getLogger(__name__)


def blank_image_folder(benchmark: WorldBenchmark, world: WorldConfig, folder: Path) -> Path:
    """A copy of the question images' folder where every image is blank (same file names)."""
    image = blank_image(world)
    for question in benchmark.questions():
        target = folder / question.image
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    return folder


def loss_curves(run_dir: Path, stages: dict[str, str], out: Path) -> Path | None:
    """Plot `train/loss` per step for each stage's CSV log into `out` (PNG); None when there are no logs.

    `stages` maps a label to its output folder, relative to `run_dir` or absolute.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    plotted = False
    for ax, (label, stage_dir) in zip(axes[0], stages.items(), strict=True):
        path = run_dir / stage_dir / "csv" / "metrics.csv"
        if not path.is_file():
            ax.set_title(f"{label}: no log")
            continue
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
        ax.plot([int(r["step"]) for r in rows], [float(r["train/loss"]) for r in rows], lw=1)
        ax.set(title=label, xlabel="optimizer step", ylabel="train/loss")
        plotted = True
    fig.tight_layout()
    if not plotted:
        plt.close(fig)
        return None
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def comparison_table(results: dict[str, Metrics]) -> Metrics:
    """One row per question type: each run's accuracy, then chance."""
    first = next(iter(results.values()))
    table: Metrics = {}
    for row in first:
        table[row] = {run: metrics[row]["acc"] for run, metrics in results.items()}
        table[row]["chance"] = first[row]["chance"]
        table[row]["n"] = first[row]["n"]
    return table


def object_count_table(answers_file: Path, benchmark: WorldBenchmark, world_dir: Path) -> Metrics:
    """Accuracy (%) of one run's answers per question type and number of objects in the scene."""
    split = accuracy_by_object_count(
        load_jsonl(answers_file), benchmark.gold(), world_dir / "scenes" / "eval.jsonl"
    )
    counts = sorted({n for cells in split.values() for n in cells})
    return {
        qtype: {
            f"{n} object{'s' if n > 1 else ''}": (
                round(cells[n]["accuracy"] * 100, 2) if n in cells else None
            )
            for n in counts
        }
        for qtype, cells in split.items()
    }


def compose_train(overrides: list[str]) -> DictConfig:
    """`conf/train.yaml` with `overrides`, resolved as a `python -m llava_lit.train` run would be."""
    GlobalHydra.instance().clear()
    cfg = compose_config("train", overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_root) / cfg.run_name / cfg.stage.name)
    return cfg


def override_key(override: str) -> str:
    """The config key a command-line override sets: `+world.seed=2` -> `world.seed`."""
    return override.split("=")[0].lstrip("+~")


def no_stage1_overrides(overrides: list[str], run_name: str) -> list[str]:
    """The `python -m llava_lit.train` overrides of the no-stage-1 ablation of run `run_name`: the same finetune
    from a fresh projector, in its own run folder (`<run_name>_no_stage1`)."""
    kept = [o for o in overrides if override_key(o) not in ("stage", "run_name", "init_projector")]
    return [*kept, "stage=finetune", "init_projector=null", f"run_name={run_name}_no_stage1"]


def no_stage1_dir(cfg: DictConfig) -> Path:
    """The output folder of the no-stage-1 ablation's finetune for the run `cfg` describes."""
    return Path(cfg.paths.output_root) / f"{cfg.run_name}_no_stage1" / "finetune"


def run(overrides: list[str]) -> dict[str, Any]:
    """Evaluate the finetuned world model and its ablations; returns and writes the report.

    `overrides` are the ones given to `python -m llava_lit.train` (world, paths, run_name...), plus
    `evaluate.*` settings (`batch_size`, `max_new_tokens`, `limit`, `no_align`: true, trained or false).
    """
    cfg = compose_train(overrides)
    settings = cfg.get("evaluate") or {}
    world_dir = Path(cfg.paths.world_dir)
    info = load_world_info(world_dir)
    if info is None:
        raise SystemExit(f"No world at {world_dir}: run `python -m llava_lit.train stage=align` first")
    world = WorldConfig(**info["config"])
    run_dir = Path(cfg.paths.output_root) / cfg.run_name
    checkpoint = run_dir / "finetune" / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise SystemExit(
            f"No finetuned checkpoint at {checkpoint}: run `python -m llava_lit.train stage=finetune`"
        )
    no_align = settings.get("no_align", True)
    if no_align not in (True, False, "trained"):
        raise SystemExit(f"evaluate.no_align={no_align!r}: use true (train it here), trained or false")
    ablation_overrides = no_stage1_overrides(overrides, cfg.run_name)
    ablation_ckpt = no_stage1_dir(cfg) / "checkpoints" / "last.ckpt"
    if no_align == "trained" and not ablation_ckpt.is_file():
        raise SystemExit(
            f"evaluate.no_align=trained, but there is no no-stage-1 checkpoint at {ablation_ckpt}: train it with "
            f"`python -m llava_lit.train {' '.join(ablation_overrides)}` or pass evaluate.no_align=true"
        )
    out = run_dir / "world_eval"
    # Prediction resumes from existing answer files; these answers belong to whatever checkpoint is there now.
    for stale in out.glob("*/answers.jsonl"):
        stale.unlink()
    benchmark = WorldBenchmark(
        question_file=str(world_dir / "eval" / "questions.jsonl"),
        answers_gt=str(world_dir / "eval" / "answers_gt.jsonl"),
        image_folder=str(world_dir / "eval" / "images"),
        limit=settings.get("limit"),
    )
    batch = dict(batch_size=settings.get("batch_size", 64), max_new_tokens=settings.get("max_new_tokens", 32))

    results: dict[str, Metrics] = {}
    results["llava"] = evaluate(benchmark, "world", out / "llava", checkpoint=str(checkpoint), **batch)
    blank = WorldBenchmark(
        benchmark.question_file,
        benchmark.answers_gt,
        str(blank_image_folder(benchmark, world, out / "blank_images")),
        limit=benchmark.limit,
    )
    results["blank image"] = evaluate(
        blank, "world", out / "blank_image", checkpoint=str(checkpoint), **batch
    )
    stages = {"align": "align", "finetune": "finetune"}
    if no_align:
        if no_align is True:
            from llava_lit.train import train

            train(compose_train(ablation_overrides))
        results["no stage 1"] = evaluate(
            benchmark, "world", out / "no_stage1", checkpoint=str(ablation_ckpt), **batch
        )
        stages["finetune, no stage 1"] = str(no_stage1_dir(cfg))

    table = comparison_table(results)
    by_objects = object_count_table(out / "llava" / "answers.jsonl", benchmark, world_dir)
    curves = loss_curves(run_dir, stages, out / "loss_curves.png")
    report = {
        "table": table,
        "by_object_count": by_objects,
        "runs": results,
        "checkpoint": str(checkpoint),
        "loss_curves": str(curves),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    from llava_lit.eval.report import print_table

    print_table(f"Miniature world, held-out accuracy (%) — {out / 'report.json'}", table)
    print_table("llava by objects in the scene (%)", by_objects)
    return report


@hydra_app("world_app")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (`conf/world_app.yaml`): the same `key=value` overrides as `python -m llava_lit.train`."""
    run(list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
