"""`python -m llava_lit.eval <benchmark> key=value ...`: build the question file, predict, score, report.

The benchmark is a Hydra choice (`conf/benchmark/<name>.yaml`, instantiated into one of the benchmark
classes); `python -m llava_lit.eval scienceqa ...` is shorthand for `benchmark=scienceqa`. Three steps:
(1) write the official question JSONL from the benchmark's official files; (2) run batched prediction into the
official answer JSONL, or take `answers_file=` of an existing answer file (re-scoring, or answers produced by
the official LLaVA scripts); (3) score, write `metrics.json` and print the table. Outputs land in `output_dir`.
"""

from __future__ import annotations

import dataclasses
import sys

import hydra
from omegaconf import DictConfig

from llava_lit.eval.run import evaluate
from llava_lit.hydra_app import hydra_app
from llava_lit.load_settings import LoadSettings

__all__ = ["benchmark_shorthand", "evaluate", "main"]


@hydra_app("eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; see `conf/eval.yaml`."""
    benchmark = hydra.utils.instantiate(cfg.benchmark)
    evaluate(
        benchmark,
        cfg.name,
        cfg.output_dir,
        answers_file=cfg.answers_file,
        checkpoint=cfg.checkpoint,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        load={f.name: cfg[f.name] for f in dataclasses.fields(LoadSettings)},
    )


def benchmark_shorthand(argv: list[str]) -> list[str]:
    """Rewrite a leading bare benchmark name (`scienceqa`) into the Hydra override `benchmark=scienceqa`."""
    if len(argv) > 1 and not argv[1].startswith("-") and "=" not in argv[1]:
        return [argv[0], f"benchmark={argv[1]}", *argv[2:]]
    return argv


if __name__ == "__main__":
    sys.argv = benchmark_shorthand(sys.argv)
    main()
