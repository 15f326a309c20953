"""`python -m llava_lit.convert`: an official LLaVA JSON file plus its image folder → WebDataset shards + manifest.

Each record is validated and each image fully decoded once here, so training never meets a missing or corrupt
file; the ones that fail are counted per reason, listed in the manifest and reported at the end, never silently
dropped. Output is deterministic: records keep their file order, keys are their index in the file, and tars
carry fixed metadata, so re-running on the same input gives byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from llava_lit.conversation import get_template
from llava_lit.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from llava_lit.records import InvalidRecord, Record, parse_record
from llava_lit.shards import MANIFEST_NAME, Manifest, ShardWriter, TokenLengthStats, write_manifest
from llava_lit.tokenization import SkipSample, encode_conversation

log = logging.getLogger(__name__)

MAX_EXAMPLES_PER_REASON = 20
"""How many skipped ids the manifest lists per reason."""


def load_records(json_path: str | Path) -> list[Any]:
    """Read a LLaVA JSON list (`.json`) or one record per line (`.jsonl`)."""
    path = Path(json_path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _member_extension(path: str, index: int, count: int) -> str:
    """Shard member key for an image: its lower-case extension, numbered when the sample has several."""
    ext = Path(path).suffix.lower().lstrip(".") or "img"
    return ext if count == 1 else f"{index}.{ext}"


def _load_images(record: Record, image_folder: Path, max_pixels: int) -> tuple[dict[str, bytes], list[str]]:
    """Read and fully decode every image of a record; raise `ImageDecodeError` naming the first bad one."""
    images: dict[str, bytes] = {}
    keys: list[str] = []
    for i, rel in enumerate(record.images):
        path = image_folder / rel
        if not path.is_file():
            raise ImageDecodeError("image_missing", rel)
        data = path.read_bytes()
        try:
            decode_image(data, max_pixels=max_pixels)
        except ImageDecodeError as err:
            raise ImageDecodeError(err.reason, f"{rel}: {err.detail}" if err.detail else rel) from err
        key = _member_extension(rel, i, len(record.images))
        images[key] = data
        keys.append(key)
    return images, keys


def convert(
    json_path: str | Path,
    image_folder: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    tokenizer: PreTrainedTokenizerBase | None = None,
    template: str = "vicuna_v1",
    system_prompt: str | None = None,
    num_image_tokens: int = 576,
    max_length: int = 2048,
    source: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_threads: int = 4,
    progress: bool = True,
) -> Manifest:
    """Convert one LLaVA JSON + image folder into `out_dir/shard-*.tar` + `out_dir/manifest.json`.

    With a tokenizer, the manifest also holds token-length statistics for `template` (with `system_prompt` in
    place of its own, when given; image markers expanded to `num_image_tokens`) and how many samples that
    template would skip. Existing shards in `out_dir` are replaced. Returns the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("shard-*.tar"), out / MANIFEST_NAME]:
        stale.unlink(missing_ok=True)
    chat_template = get_template(template, system=system_prompt)
    raw_records = load_records(json_path)
    source = source or Path(json_path).stem
    folder = Path(image_folder)

    def check(index_raw: tuple[int, Any]) -> tuple[int, Any, Record | None, dict[str, bytes], list[str]]:
        index, raw = index_raw
        try:
            record = parse_record(raw)
            images, keys = _load_images(record, folder, max_pixels)
        except (InvalidRecord, ImageDecodeError) as err:
            return index, err, None, {}, []
        return index, None, record, images, keys

    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    token_lengths: list[int] = []
    token_skips: Counter[str] = Counter()
    writer = ShardWriter(out, samples_per_shard)
    # Threads overlap file reads and decodes; `map` keeps file order, so the output stays deterministic.
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results: Iterator = pool.map(check, enumerate(raw_records))
        for index, error, record, images, keys in tqdm(
            results, total=len(raw_records), desc=f"convert {source}", disable=not progress, unit="rec"
        ):
            if error is not None:
                skipped[error.reason] += 1
                record_id = (
                    raw_records[index].get("id", index) if isinstance(raw_records[index], dict) else index
                )
                if len(examples.setdefault(error.reason, [])) < MAX_EXAMPLES_PER_REASON:
                    examples[error.reason].append(f"{record_id}: {error.detail}")
                continue
            assert record is not None
            payload = {
                "id": record.id,
                "conversations": list(record.conversations),
                "source": source,
                "images": list(record.images),
                "image_keys": keys,
            }
            writer.write(f"{index:09d}", payload, images)
            if tokenizer is not None:
                try:
                    encoded = encode_conversation(
                        record.conversations,
                        tokenizer=tokenizer,
                        template=chat_template,
                        num_image_tokens=num_image_tokens,
                        max_length=max_length,
                        num_images=len(record.images),
                    )
                    token_lengths.append(len(encoded.input_ids))
                except SkipSample as err:
                    token_skips[err.reason] += 1
    writer.close()

    shards = writer.shards
    manifest = Manifest(
        source=source,
        num_samples=sum(s.num_samples for s in shards),
        num_image_samples=sum(s.num_image_samples for s in shards),
        num_text_samples=sum(s.num_text_samples for s in shards),
        shards=shards,
        skipped=dict(sorted(skipped.items())),
        skipped_examples=dict(sorted(examples.items())),
        token_lengths=(
            TokenLengthStats.from_lengths(
                token_lengths, template=template, num_image_tokens=num_image_tokens, skipped=dict(token_skips)
            )
            if tokenizer is not None
            else None
        ),
    )
    write_manifest(out, manifest)
    for reason, count in manifest.skipped.items():
        log.warning("%s: skipped %d records (%s), e.g. %s", source, count, reason, examples[reason][:3])
    return manifest


@dataclass
class ConvertArgs:
    """Command-line settings of `python -m llava_lit.convert` (each field is a `--flag`)."""

    json: str = field(metadata={"help": "LLaVA JSON list (or .jsonl) of records"})
    image_folder: str = field(metadata={"help": "folder the records' `image` paths are relative to"})
    out: str = field(metadata={"help": "output folder for shard-*.tar and manifest.json"})
    shard_size: int = field(default=1000, metadata={"help": "samples per shard"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer (hub id or folder) for length stats"}
    )
    template: str = field(default="vicuna_v1", metadata={"help": "chat template for length stats"})
    system_prompt: str | None = field(
        default=None, metadata={"help": "system prompt replacing the template's for length stats"}
    )
    num_image_tokens: int = field(default=576, metadata={"help": "tokens per image for length stats"})
    max_length: int = field(default=2048, metadata={"help": "model max length for length stats"})
    source: str | None = field(default=None, metadata={"help": "source name (default: JSON file stem)"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "reject images with more pixels"})
    num_threads: int = field(default=4, metadata={"help": "threads reading and verifying images"})


def parse_args(argv: list[str]) -> ConvertArgs:
    """Build the flag parser from `ConvertArgs`' fields and parse `argv`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llava_lit.convert", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(ConvertArgs):
        required = f.default is dataclasses.MISSING
        kind = int if f.type in ("int", int) else str
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            required=required,
            default=None if required else f.default,
            help=f.metadata["help"],
        )
    return ConvertArgs(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> Manifest:
    """CLI entry point: convert, then print the manifest summary and the skip report."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tokenizer = None
    if args.tokenizer:
        from llava_lit.tokenization import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    manifest = convert(
        args.json,
        args.image_folder,
        args.out,
        samples_per_shard=args.shard_size,
        tokenizer=tokenizer,
        template=args.template,
        system_prompt=args.system_prompt,
        num_image_tokens=args.num_image_tokens,
        max_length=args.max_length,
        source=args.source,
        max_pixels=args.max_pixels,
        num_threads=args.num_threads,
    )
    print(
        f"{manifest.num_samples} samples ({manifest.num_image_samples} with images, "
        f"{manifest.num_text_samples} text-only) in {len(manifest.shards)} shards -> {args.out}"
    )
    print(f"skipped: {manifest.skipped or 'none'}")
    if manifest.token_lengths is not None:
        t = manifest.token_lengths
        print(f"tokens: mean {t.mean} p50 {t.p50} p95 {t.p95} max {t.max}; would skip {t.skipped or 'none'}")
    return manifest


if __name__ == "__main__":
    main()
