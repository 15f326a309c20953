"""The shard sample format and `manifest.json`: what the converter writes and the datamodule reads.

A shard is a plain WebDataset tar. Each sample has a dot-free `__key__` and the members
`<key>.json` (the record: `id`, `conversations`, `source`, `images` = original paths, `image_keys` = member
extensions in marker order) and, for image samples, the raw image bytes under their original extension
(`<key>.jpg`; `<key>.0.jpg`, `<key>.1.png`, ... when a sample has several images). Tars are written with fixed
metadata (mtime 0, uid/gid 0, sorted members) so the same input gives byte-identical shards. Reading uses
webdataset's tar iterators with explicit decoders only: JSON is parsed with `json`, images stay bytes for
`images.decode_image`; nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import statistics
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_iterator

MANIFEST_NAME = "manifest.json"
"""File name of the manifest beside the shards."""

SHARD_NAME = "shard-{index:06d}.tar"
"""File name pattern of shards."""

MANIFEST_VERSION = 1
"""Bumped when the sample format or manifest fields change."""


@dataclass
class ShardInfo:
    """One shard's entry in the manifest."""

    name: str
    """File name, relative to the manifest's folder."""
    num_samples: int
    """Samples in the shard."""
    num_image_samples: int
    """Samples with at least one image."""
    num_text_samples: int
    """Text-only samples."""


@dataclass
class TokenLengthStats:
    """Token lengths (image runs expanded) of the samples, as the datamodule will encode them."""

    template: str
    """Template used to render the samples."""
    num_image_tokens: int
    """Tokens per image used for the expansion."""
    count: int
    """Samples that encoded (the others are in `skipped`)."""
    min: int
    """Shortest sample."""
    max: int
    """Longest sample."""
    mean: float
    """Mean length."""
    p50: float
    """Median length."""
    p95: float
    """95th percentile."""
    p99: float
    """99th percentile."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples that would be skipped at training with this tokenizer/template, per reason (still written)."""

    @classmethod
    def from_lengths(
        cls, lengths: list[int], *, template: str, num_image_tokens: int, skipped: dict[str, int]
    ) -> TokenLengthStats:
        """Summarise a list of lengths."""
        count = len(lengths)
        ordered = sorted(lengths) or [0]

        def pct(q: float) -> float:
            return float(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))])

        return cls(
            template=template,
            num_image_tokens=num_image_tokens,
            count=count,
            min=ordered[0],
            max=ordered[-1],
            mean=round(statistics.fmean(ordered), 3),
            p50=pct(0.5),
            p95=pct(0.95),
            p99=pct(0.99),
            skipped=dict(sorted(skipped.items())),
        )


@dataclass
class Manifest:
    """Summary of a shard folder, read by training to size epochs and schedules without scanning."""

    source: str
    """Name of the data source (default: the JSON file's stem)."""
    num_samples: int
    """Samples written, over all shards."""
    num_image_samples: int
    """Samples with images."""
    num_text_samples: int
    """Text-only samples."""
    shards: list[ShardInfo]
    """Per-shard counts, in shard order."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Records not written, per reason (missing/corrupt images, invalid records)."""
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few record ids (and image paths) skipped for each reason, to find them in the source."""
    token_lengths: TokenLengthStats | None = None
    """Token-length statistics, when the converter was given a tokenizer."""
    version: int = MANIFEST_VERSION
    """Format version."""

    def to_json(self) -> str:
        """Stable, human-readable JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse a manifest dict (as written by `to_json`)."""
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"manifest version {data.get('version')} != {MANIFEST_VERSION}; re-run the converter"
            )
        tokens = data.get("token_lengths")
        return cls(
            source=data["source"],
            num_samples=data["num_samples"],
            num_image_samples=data["num_image_samples"],
            num_text_samples=data["num_text_samples"],
            shards=[ShardInfo(**s) for s in data["shards"]],
            skipped=data.get("skipped", {}),
            skipped_examples=data.get("skipped_examples", {}),
            token_lengths=TokenLengthStats(**tokens) if tokens else None,
            version=data["version"],
        )


def read_manifest(folder: str | Path) -> Manifest:
    """Read `<folder>/manifest.json`; the error names the converter when it is missing."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the shards with `python -m llava_lit.convert`")
    return Manifest.from_dict(json.loads(path.read_text()))


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write `manifest.json` into `folder`."""
    path = Path(folder) / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


class ShardWriter:
    """Writes samples into numbered tars of `samples_per_shard` samples, deterministically."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, record: dict[str, Any], images: dict[str, bytes]) -> None:
        """Add one sample: its record JSON and its image bytes keyed by member extension (`jpg`, `0.png`)."""
        if "." in key or "/" in key:
            raise ValueError(f"shard keys must not contain '.' or '/': {key!r}")
        if self._tar is None or self.shards[-1].num_samples >= self.samples_per_shard:
            self._open_next()
        assert self._tar is not None
        members = {"json": json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"), **images}
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(members[ext])
            info.mtime = 0
            info.mode = 0o444
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(members[ext]))
        shard = self.shards[-1]
        shard.num_samples += 1
        if images:
            shard.num_image_samples += 1
        else:
            shard.num_text_samples += 1

    def _open_next(self) -> None:
        self.close()
        name = SHARD_NAME.format(index=len(self.shards))
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(ShardInfo(name=name, num_samples=0, num_image_samples=0, num_text_samples=0))

    def close(self) -> None:
        """Finish the current shard."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def iter_raw_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one shard: `{"__key__", "json": bytes, "<ext>": bytes, ...}` in tar order."""
    with open(path, "rb") as stream:
        files = ({**f, "__url__": str(path)} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)


def parse_sample(raw: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    """Decode a raw sample explicitly: the record from JSON, and its image bytes in marker order."""
    if "json" not in raw:
        raise ValueError(f"sample {raw.get('__key__')!r} in {raw.get('__url__')} has no json member")
    record = json.loads(raw["json"].decode("utf-8"))
    images = [raw[ext] for ext in record.get("image_keys", [])]
    return record, images
