"""Throughput and CPU cost of the full data pipeline against the official LLaVA loader on the same data.

Both sides do the same work per sample: decode a 640x480 JPEG, pad to square (LLaVA-1.5 `pad`), CLIP 336-px
resize + normalise, render + tokenize + mask a Vicuna-v1 conversation with 576 image tokens (about 854 tokens a
sample), collate batches of 16 with 2 DataLoader workers. llava_lit streams WebDataset shards through
`LlavaDataModule` (uint8 pixels, normalised later on the device); the official side is `LazySupervisedDataset` +
`DataCollatorForSupervisedDataset` imported from a checkout given with `--official-repo` and run by
`benchmarks/official_loader.py` under `--official-python` (a venv with the transformers 4.37-era stack the
official code needs). Without `--official-repo` the official side is this file's re-implementation of its data
path on our stack. Passes alternate between the sides; the medians are reported. `--stages` prints the CPU
milliseconds of each per-sample stage on one thread.

    .venv/bin/python benchmarks/bench_data.py --official-repo /path/to/LLaVA \\
        --official-python /path/to/venv_official/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPImageProcessor

from llava_lit.collate import collate
from llava_lit.convert import convert
from llava_lit.datamodule import LlavaDataModule
from llava_lit.images import ImageLoader, decode_image, expand_to_square, mean_fill_color
from llava_lit.tokenization import encode_conversation, load_tokenizer

OFFICIAL_LOADER = Path(__file__).with_name("official_loader.py")
"""The script that runs the official loader under the official venv's interpreter."""

NUM_IMAGE_TOKENS = 576
"""Image tokens per sample (CLIP ViT-L/14 at 336 px)."""


@dataclass
class BenchArgs:
    """Benchmark settings (each field is a `--flag`)."""

    samples: int = field(default=300, metadata={"help": "samples (640x480 JPEGs) in the synthetic dataset"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers on both sides"})
    batch_size: int = field(default=16, metadata={"help": "micro batch size"})
    image_size: int = field(default=336, metadata={"help": "vision tower input size"})
    shard_size: int = field(default=64, metadata={"help": "samples per shard"})
    repeats: int = field(default=3, metadata={"help": "timed passes per side, alternating; medians reported"})
    official_repo: str = field(default="", metadata={"help": "checkout of the official LLaVA code"})
    official_python: str = field(
        default=sys.executable, metadata={"help": "interpreter that can import the official code"}
    )
    stages: bool = field(default=False, metadata={"help": "also print per-stage CPU ms on one thread"})
    resize: str = field(default="pil", metadata={"help": "llava_lit's resize: pil (exact) or torch (faster)"})
    pre_resize: bool = field(
        default=False,
        metadata={"help": "also time shards converted with pre_resize (images stored at --image-size)"},
    )


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def conversation(i: int) -> list[dict[str, str]]:
    """A two-round Vicuna conversation whose text runs from about 110 to 450 tokens (mean about 280)."""
    return [
        {"from": "human", "value": f"<image>\nDescribe photo {i} in detail."},
        {"from": "gpt", "value": "The photo shows a detailed scene with several objects. " * (7 + i % 29)},
        {"from": "human", "value": "What colours dominate?"},
        {"from": "gpt", "value": "Mostly warm colours, with some blue and green."},
    ]


def build_dataset(root: Path, n: int) -> Path:
    """JSON list + image folder of `n` 640x480 JPEGs made from real photos (scikit-image / scikit-learn)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [getattr(data, k)() for k in ("astronaut", "chelsea", "coffee", "rocket")]
    photos += list(load_sample_images().images)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        image = Image.fromarray(photos[i % len(photos)]).resize((640, 480)).rotate(i % 17)
        image.save(root / "images" / f"{i:06d}.jpg", quality=90)
        records.append({"id": f"b{i}", "image": f"{i:06d}.jpg", "conversations": conversation(i)})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


class OfficialStyleDataset(Dataset):
    """The official data path on our stack: the JSON list in memory, `Image.open` per sample, pad, processor."""

    def __init__(self, json_path: Path, image_folder: Path, tokenizer, processor) -> None:
        self.records = json.loads(json_path.read_text())
        self.folder, self.tokenizer, self.processor = image_folder, tokenizer, processor
        self.fill = mean_fill_color(processor)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        image = Image.open(self.folder / record["image"]).convert("RGB")
        image = expand_to_square(image, self.fill)
        pixels = self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        encoded = encode_conversation(
            record["conversations"],
            tokenizer=self.tokenizer,
            template="vicuna_v1",
            num_image_tokens=NUM_IMAGE_TOKENS,
            max_length=2048,
            num_images=1,
        )
        return {
            "id": record["id"],
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": pixels[None],
        }


def timed(loader) -> dict[str, float]:
    """One full pass: seconds, samples and CPU seconds (this process and its joined workers)."""
    cpu0, start, count = cpu_seconds(), time.perf_counter(), 0
    for batch in loader:
        count += len(batch["input_ids"])
    return {"seconds": time.perf_counter() - start, "samples": count, "cpu_seconds": cpu_seconds() - cpu0}


def official_pass(args: BenchArgs, root: Path) -> dict[str, float]:
    """One pass of the official loader in a subprocess under `args.official_python`."""
    env = dict(os.environ, PYTHONPATH=args.official_repo, TOKENIZERS_PARALLELISM="false")
    command = [
        args.official_python,
        str(OFFICIAL_LOADER),
        *("--data", str(root / "raw" / "data.json"), "--images", str(root / "raw" / "images")),
        *("--tokenizer", str(root / "tokenizer"), "--processor", str(root / "processor")),
        *("--batch-size", str(args.batch_size), "--workers", str(args.workers), "--passes", "1"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the official loader failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def stage_timings(
    json_path: Path, image_folder: Path, tokenizer, processor, resize: str, n: int = 64
) -> dict[str, float]:
    """Mean CPU ms per sample of each stage, on one thread, over the first `n` samples."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    records = json.loads(json_path.read_text())[:n]
    blobs = [(image_folder / r["image"]).read_bytes() for r in records]
    loader = ImageLoader(processor, aspect="pad", resize=resize)  # type: ignore[arg-type]
    fill = mean_fill_color(processor)
    out: dict[str, float] = {}

    def clock(name: str, fn) -> list:
        start = time.process_time()
        results = [fn(i) for i in range(len(records))]
        out[name] = (time.process_time() - start) / len(records) * 1e3
        return results

    images = clock("jpeg decode", lambda i: decode_image(blobs[i]))
    clock(
        "image: CLIP processor call",
        lambda i: processor(images=expand_to_square(images[i], fill), return_tensors="pt"),
    )
    clock("image: llava_lit (pad + resize, uint8)", lambda i: loader.pixels(images[i]))
    encoded = clock(
        "tokenize + mask",
        lambda i: encode_conversation(
            records[i]["conversations"],
            tokenizer=tokenizer,
            template="vicuna_v1",
            num_image_tokens=NUM_IMAGE_TOKENS,
            max_length=2048,
            num_images=1,
        ),
    )
    pixels = [loader(b) for b in blobs]
    samples = [
        {"id": str(i), "input_ids": e.input_ids, "labels": e.labels, "pixel_values": p[None]}
        for i, (e, p) in enumerate(zip(encoded, pixels, strict=True))
    ]
    start = time.process_time()
    for k in range(0, len(samples), 16):
        collate(samples[k : k + 16], tokenizer.pad_token_id)
    out["collate"] = (time.process_time() - start) / len(samples) * 1e3
    out["mean tokens"] = float(np.mean([len(e.input_ids) for e in encoded]))
    return out


def parse_args() -> BenchArgs:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(BenchArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
        else:
            kind = int if f.type == "int" else str
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f.metadata["help"])
    return BenchArgs(**vars(parser.parse_args()))


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import mistral_common

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir = root / "tokenizer"
        tok_dir.mkdir()
        (tok_dir / "tokenizer.model").write_bytes(
            (Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1").read_bytes()
        )
        tokenizer = load_tokenizer(str(tok_dir))
        size = args.image_size
        processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        )
        processor.save_pretrained(str(root / "processor"))
        json_path = build_dataset(root / "raw", args.samples)
        t0 = time.perf_counter()
        convert(
            json_path,
            root / "raw" / "images",
            root / "shards",
            samples_per_shard=args.shard_size,
            progress=False,
        )
        convert_s = time.perf_counter() - t0

        if args.pre_resize:
            convert(
                json_path,
                root / "raw" / "images",
                root / "shards_pre",
                samples_per_shard=args.shard_size,
                pre_resize=size,
                image_aspect="pad",
                progress=False,
            )

        def data_module(folder: Path) -> LlavaDataModule:
            dm = LlavaDataModule(
                sources=str(folder),
                tokenizer=tokenizer,
                image_processor=processor,
                num_image_tokens=NUM_IMAGE_TOKENS,
                template="vicuna_v1",
                max_length=2048,
                image_aspect="pad",
                image_resize=args.resize,
                micro_batch_size=args.batch_size,
                num_workers=args.workers,
                shuffle_buffer=64,
                pin_memory=False,
            )
            dm.setup("fit")
            return dm

        dm = data_module(root / "shards")
        loader = dm.train_dataloader()
        pre_loader = data_module(root / "shards_pre").train_dataloader() if args.pre_resize else None
        if args.official_repo:
            label = f"official LazySupervisedDataset ({args.official_repo})"
            run_official = lambda: official_pass(args, root)  # noqa: E731
        else:
            label = "official-style re-implementation"
            reimplementation = DataLoader(
                OfficialStyleDataset(json_path, root / "raw" / "images", tokenizer, processor),
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.workers,
                collate_fn=lambda s: collate(s, tokenizer.pad_token_id),
            )
            run_official = lambda: timed(reimplementation)  # noqa: E731
        ours, theirs, pre = [], [], []
        for _ in range(args.repeats):  # alternate, so both sides see the same machine load
            ours.append(timed(loader))
            theirs.append(run_official())
            if pre_loader is not None:
                pre.append(timed(pre_loader))
        assert dm.skip_counts == {k: 0 for k in dm.skip_counts}, dm.skip_counts
        stages = (
            stage_timings(json_path, root / "raw" / "images", tokenizer, processor, args.resize)
            if args.stages
            else {}
        )

    def summary(runs: list[dict[str, float]]) -> tuple[float, float]:
        rate = statistics.median(r["samples"] / r["seconds"] for r in runs)
        cpu_ms = statistics.median(r["cpu_seconds"] / r["samples"] * 1e3 for r in runs)
        return rate, cpu_ms

    (our_rate, our_cpu), (their_rate, their_cpu) = summary(ours), summary(theirs)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cpus, {args.samples} samples, {size}px pad, "
        f"{args.resize} resize, batch {args.batch_size}, {args.workers} workers, {args.repeats} alternating passes per side (medians)"
    )
    print(f"convert (read + verify + shard): {args.samples / convert_s:.1f} samples/s")
    print(f"llava_lit shards + LlavaDataModule: {our_rate:7.1f} samples/s  {our_cpu:6.2f} CPU ms/sample")
    if pre:
        pre_rate, pre_cpu = summary(pre)
        print(f"llava_lit pre-resized shards:      {pre_rate:7.1f} samples/s  {pre_cpu:6.2f} CPU ms/sample")
    print(f"{label}: {their_rate:7.1f} samples/s  {their_cpu:6.2f} CPU ms/sample")
    print(
        f"ratio llava_lit / official: {our_rate / their_rate:.2f}x samples/s, {their_cpu / our_cpu:.2f}x less CPU"
    )
    for name, value in stages.items():
        print(f"  stage {name}: {value:.2f}")


if __name__ == "__main__":
    main()
