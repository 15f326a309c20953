"""Throughput of the full data pipeline against the official LLaVA way of loading the same data, in one run.

Both sides do the same work per sample: decode a JPEG, pad to square (LLaVA-1.5 `pad`), the CLIP 336-px image
processor, render + tokenize + mask a Vicuna conversation with 576 image tokens, collate, with 2 DataLoader
workers. llava_lit streams WebDataset shards; the official way reads a JSON list and calls `Image.open` on one
file per sample from an image folder (`LazySupervisedDataset`). Prints samples/s of each and the ratio.

    .venv/bin/python benchmarks/bench_data.py --samples 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
from llava_lit.images import expand_to_square, mean_fill_color
from llava_lit.tokenization import encode_conversation, load_tokenizer


@dataclass
class BenchArgs:
    """Benchmark settings (each field is a `--flag`)."""

    samples: int = field(default=512, metadata={"help": "samples in the synthetic dataset"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers on both sides"})
    batch_size: int = field(default=16, metadata={"help": "micro batch size"})
    image_size: int = field(default=336, metadata={"help": "vision tower input size"})
    shard_size: int = field(default=64, metadata={"help": "samples per shard"})
    epochs: int = field(default=2, metadata={"help": "passes per side; the best one is reported"})


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
        records.append(
            {
                "id": f"b{i}",
                "image": f"{i:06d}.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\nDescribe photo {i} in detail."},
                    {
                        "from": "gpt",
                        "value": "The photo shows a detailed scene with several objects. " * (1 + i % 4),
                    },
                    {"from": "human", "value": "What colours dominate?"},
                    {"from": "gpt", "value": "Mostly warm colours, with some blue and green."},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


class OfficialStyleDataset(Dataset):
    """The official LLaVA data path: the whole JSON list in memory, `Image.open` per sample, pad, processor."""

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
            num_image_tokens=576,
            max_length=2048,
            num_images=1,
        )
        return {
            "id": record["id"],
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": pixels[None],
        }


def timed(loader) -> tuple[float, int]:
    """Seconds for one full pass and the samples it yielded."""
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["ids"])
    return time.perf_counter() - start, count


def parse_args() -> BenchArgs:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(BenchArgs):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=int, default=f.default, help=f.metadata["help"]
        )
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

        dm = LlavaDataModule(
            sources=str(root / "shards"),
            tokenizer=tokenizer,
            image_processor=processor,
            num_image_tokens=576,
            template="vicuna_v1",
            max_length=2048,
            image_aspect="pad",
            micro_batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=64,
            pin_memory=False,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        official = DataLoader(
            OfficialStyleDataset(json_path, root / "raw" / "images", tokenizer, processor),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            collate_fn=lambda s: collate(s, tokenizer.pad_token_id),
        )
        ours, theirs = [], []
        for _ in range(args.epochs):  # alternate, so both sides see the same machine load
            seconds, count = timed(loader)
            ours.append(count / seconds)
            seconds, count = timed(official)
            theirs.append(count / seconds)
        assert dm.skip_counts == {k: 0 for k in dm.skip_counts}, dm.skip_counts

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"{args.samples} samples, {size}px, batch {args.batch_size}, {args.workers} workers"
    )
    print(f"convert (read + verify + shard): {args.samples / convert_s:.1f} samples/s")
    print(
        f"llava_lit shards + LlavaDataModule : {max(ours):.1f} samples/s  (runs: {np.round(ours, 1).tolist()})"
    )
    print(
        f"official JSON + folder + Image.open: {max(theirs):.1f} samples/s  (runs: {np.round(theirs, 1).tolist()})"
    )
    print(f"ratio llava_lit / official: {max(ours) / max(theirs):.2f}x")


if __name__ == "__main__":
    main()
