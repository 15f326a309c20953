"""Padding waste of random, length-grouped and packed batches, and stage-2 tokens/s packed against padded.

    .venv/bin/python benchmarks/bench_packing.py [--world-preset ci] [--steps 24] [--threads 2]

Padding waste = padded tokens / all tokens of the batches (rows x padded length), on two length mixes:

* the miniature world's stage-2 data, through the real `LlavaDataModule` (`conf/data/world_finetune.yaml`,
  micro-batch 32, no accumulation): one epoch of batches per setting. The world is built first if missing
  (`--world-preset ci`, the default here, builds the miniature one in under a minute; `default` is the
  `make demo` world, several minutes);
* a SYNTHETIC mix shaped like LLaVA-1.5's mix665k with max_length 2048 (not measured on the real data): 40 %
  text-only rows of 30-150 tokens, 57 % image rows of 576 image tokens + 50-1400 text tokens (uniform), 3 % rows
  of 1900-2048 tokens; micro-batch 16 as in the LLaVA-1.5 recipes (8 ranks, no accumulation). Batching is
  simulated on the lengths with the same functions the data module uses.

"pool" is the number of micro-batches whose samples are grouped together (`length_group_steps` without
accumulation): random order ignores it, length grouping sorts the pool's samples, packing packs them.

Then the world's stage 2 is trained for `--steps` micro-batches (eager, AdamW; fp32, or bf16 autocast as
`trainer=cpu` with `--bf16`, which is emulated and slow on CPUs without AMX / AVX512-BF16), padded and packed,
and real (non-padding) tokens and samples per second are printed.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llava_lit.packing import pack_into_batches, padded_size  # noqa: E402

SYNTHETIC_SAMPLES = 40_000
SYNTHETIC_MICRO_BATCH = 16
MAX_LENGTH = 2048


def synthetic_mix665k_lengths(n: int, seed: int = 0) -> list[int]:
    """Token lengths of a synthetic mix665k-like mix (see the module docstring; not the real data)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.40:
            out.append(rng.randint(30, 150))
        elif u < 0.97:
            out.append(576 + rng.randint(50, 1400))
        else:
            out.append(rng.randint(1900, MAX_LENGTH))
    return out


def waste(lengths: Sequence[int], micro_batch: int, pool: int, how: str) -> float:
    """Padded share of all tokens when `lengths` (in stream order) are batched `how` with pools of `pool`."""
    real = total = 0
    step = micro_batch * pool
    for start in range(0, len(lengths), step):
        group = list(lengths[start : start + step])
        num_batches = math.ceil(len(group) / micro_batch)
        if how == "packed":
            total += padded_size(group, pack_into_batches(group, MAX_LENGTH, num_batches))
        else:
            if how == "grouped":
                group.sort()
            total += sum(
                len(group[i : i + micro_batch]) * max(group[i : i + micro_batch])
                for i in range(0, len(group), micro_batch)
            )
        real += sum(group)
    return 1 - real / total


def world_datamodule(preset: str, **data: object):
    """The world's stage-2 data module (built by `build_components`, real config), with `data` overrides."""
    from llava_lit.train import build_components
    from llava_lit.world.evaluate import compose_train

    overrides = ["stage=finetune", "init_projector=null", f"world.preset={preset}"]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    cfg = compose_train(overrides)
    module, datamodule = build_components(cfg)
    datamodule.setup("fit")
    return module, datamodule


def batch_waste(batches: Sequence[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1 - real / sum(b["attention_mask"].numel() for b in batches)


def train_tokens_per_s(module, batches: Sequence[dict], bf16: bool, warmup: int = 2) -> tuple[float, float]:
    """(real tokens/s, samples/s) of forward + backward + AdamW over `batches`, after `warmup` steps."""
    import torch

    from llava_lit.module import next_token_loss

    model = module.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = samples = 0
    elapsed = 0.0
    for k, batch in enumerate(batches):
        start = time.perf_counter()
        position_ids = batch.get("position_ids")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["pixel_values"],
                position_ids=position_ids,
                packed=position_ids is not None,
            ).logits
            loss = next_token_loss(logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= warmup:
            elapsed += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
            samples += len(batch["ids"])
    return tokens / elapsed, samples / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-preset", default="ci", choices=["ci", "default"])
    parser.add_argument("--steps", type=int, default=24, help="micro-batches trained per variant (2 warm up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (default fp32)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    print(f"padding waste (padded / all tokens), world stage 2 ({args.world_preset} preset), micro-batch 32")
    print(f"{'pool':>5} {'random':>8} {'grouped':>8} {'packed':>8}")
    world_batches = {}
    for pool in (1, 8):
        row = []
        for how, data in (
            ("random", {}),
            ("grouped", {"group_by_length": True, "length_group_steps": pool}),
            ("packed", {"packing": True, "length_group_steps": pool}),
        ):
            module, dm = world_datamodule(args.world_preset, **data)
            batches = list(dm.train_dataloader())
            world_batches[how, pool] = (module, batches)
            row.append(batch_waste(batches))
        print(f"{pool:>5} " + " ".join(f"{w:>7.1%}" for w in row))

    lengths = synthetic_mix665k_lengths(SYNTHETIC_SAMPLES)
    print(
        f"\npadding waste, SYNTHETIC mix665k-like lengths ({SYNTHETIC_SAMPLES} samples, mean "
        f"{sum(lengths) / len(lengths):.0f} tokens), micro-batch {SYNTHETIC_MICRO_BATCH}, max_length {MAX_LENGTH}"
    )
    print(f"{'pool':>5} {'random':>8} {'grouped':>8} {'packed':>8}")
    for pool in (1, 2, 4, 8, 16):
        row = [waste(lengths, SYNTHETIC_MICRO_BATCH, pool, how) for how in ("random", "grouped", "packed")]
        print(f"{pool:>5} " + " ".join(f"{w:>7.1%}" for w in row))

    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"\nworld stage-2 training, {args.steps} micro-batches, {args.threads} threads, eager, {precision}")
    print(f"{'batches':>18} {'tokens/s':>9} {'samples/s':>10} {'rows x len':>11}")
    for how, pool in (("random", 1), ("packed", 1), ("packed", 8)):
        module, batches = world_batches[how, pool]
        torch.manual_seed(0)
        tokens_s, samples_s = train_tokens_per_s(module, batches[: args.steps], args.bf16)
        shape = "x".join(str(n) for n in batches[0]["input_ids"].shape)
        name = "padded" if how == "random" else f"packed, pool {pool}"
        print(f"{name:>18} {tokens_s:>9.0f} {samples_s:>10.1f} {shape:>11}")


if __name__ == "__main__":
    main()
