"""Stage-2 training step of the miniature world's LLaVA: eager against compiled decoder layers, per thread count.

    .venv/bin/python benchmarks/bench_train_step.py [--threads 1 2] [--steps 12] [key=value overrides...]

Composes the real `conf/train.yaml` (`stage=finetune`, a fresh projector; extra arguments are Hydra overrides),
builds the world first if it is missing, takes the first `--steps` batches of the stage's data loader and times
forward + backward + AdamW under the trainer's bf16 autocast, in a plain loop: once eager, once with
`module.compile_blocks`'s per-layer compile. Each variant runs in its own process, so one variant's compiled
code or thread pool does not reach the next. Prints the compile time (first two steps) and the mean of the
remaining steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(threads: int, compiled: bool, steps: int, overrides: list[str]) -> dict:
    """One variant, in this process: seconds of the first two steps and the mean of the rest."""
    import torch

    from llava_lit.module import compile_decoder_layers, next_token_loss
    from llava_lit.train import build_components
    from llava_lit.world.evaluate import compose_train

    torch.set_num_threads(threads)
    cfg = compose_train(["stage=finetune", "init_projector=null", *overrides])
    module, datamodule = build_components(cfg)
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    batches = [next(batches) for _ in range(steps)]
    model = module.model
    if compiled:
        compile_decoder_layers(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for batch in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
            loss = next_token_loss(logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "first_two_steps_s": round(sum(times[:2]), 2),
        "step_s": round(sum(times[2:]) / len(times[2:]), 3),
        "batch": list(batches[0]["input_ids"].shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--steps", type=int, default=12, help="batches timed per variant (the first 2 warm up)"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # "<threads>:<compiled>", run in a child process
    args, overrides = parser.parse_known_args()
    if args.variant:
        threads, compiled = args.variant.split(":")
        print(json.dumps(measure(int(threads), compiled == "1", args.steps, overrides)))
        return
    print(f"{'threads':>7} {'layers':>8} {'first 2 steps':>14} {'step':>8}")
    for threads in args.threads:
        for compiled in (False, True):
            variant = f"--variant={threads}:{int(compiled)}"
            cmd = [sys.executable, __file__, variant, f"--steps={args.steps}", *overrides]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            name = "compiled" if compiled else "eager"
            print(f"{threads:>7} {name:>8} {result['first_two_steps_s']:>12.1f} s {result['step_s']:>6.3f} s")


if __name__ == "__main__":
    main()
