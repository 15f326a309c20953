"""The shard sample format and `manifest.json`: what the converter writes and the datamodule reads.

A shard is a plain WebDataset tar. Each sample has a dot-free `__key__` and the members
`<key>.json` (the record: `id`, `conversations`, `source`, `images` = original paths, `image_keys` = member
extensions in marker order) and, for image samples, the raw image bytes under their original extension
(`<key>.jpg`; `<key>.0.jpg`, `<key>.1.png`, ... when a sample has several images). Tars are written with fixed
metadata (mtime 0, uid/gid 0, sorted members) so the same input gives byte-identical shards. Reading uses
webdataset's tar iterators with explicit decoders only: JSON is parsed with `json`, images stay bytes for
`images.decode_image`; nothing is ever unpickled.

The manifest records each shard's sample count and byte size, so a reader can tell a damaged shard (truncated,
replaced, missing) from the file system alone; `scan_shard` counts the samples a damaged shard still holds.
Manifests of version 1 (without sizes) are still read.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_iterator

from llava_lit.atomic_files import atomic_write_text

MANIFEST_NAME = "manifest.json"
"""File name of the manifest beside the shards."""

SHARD_NAME = "shard-{index:06d}.tar"
"""File name pattern of shards."""

MANIFEST_VERSION = 2
"""Bumped when the sample format or manifest fields change (2: shards carry `size_bytes`)."""

PRE_RESIZED_MANIFEST_VERSION = 3
"""Version of a manifest whose images are stored pre-resized (`Manifest.pre_resized`): readers that do not
know the field refuse it instead of taking the stored images for the originals."""

READABLE_MANIFEST_VERSIONS = (1, 2, 3)
"""Manifest versions `Manifest.from_dict` reads; the sample format is the same in all of them."""

SHARD_LOSS_REASONS = ("shard_short", "shard_unreadable")
"""Why samples the manifest lists are not read: the shard ends early (`shard_short`), or a read error (a cut
or corrupt tar, an I/O error, a missing file) stops it (`shard_unreadable`)."""

SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
"""What reading a damaged shard raises: a truncated or corrupt tar (`tarfile.ReadError`), an I/O error or a
missing file (`OSError`), a duplicated member (`ValueError` from webdataset's grouping)."""


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
    size_bytes: int | None = None
    """Size of the tar file as written, so training finds a truncated or replaced shard with one `stat`
    before the first batch; None in manifests of version 1."""


@dataclass
class TokenLengthStats:
    """Token lengths (image runs expanded) of the samples, as the datamodule will encode them."""

    template: str
    """Template used to render the samples."""
    num_image_tokens: int
    """Tokens per image used for the expansion (per tower view when `anyres` is set)."""
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
    anyres: dict[str, Any] | None = None
    """`{"grid_pinpoints", "tile_size"}` when each image's run was counted from its size by AnyRes tiling
    (`image_tiling.TileLayout`, unpad and newline on); None when every image counts `num_image_tokens`."""

    @classmethod
    def from_lengths(
        cls,
        lengths: list[int],
        *,
        template: str,
        num_image_tokens: int,
        skipped: dict[str, int],
        anyres: dict[str, Any] | None = None,
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
            anyres=anyres,
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
    pre_resized: dict[str, Any] | None = None
    """`{"height", "width", "aspect"}` when the images are stored already resized for a vision tower of that
    output size in that aspect mode (lossless PNG, `convert pre_resize=SIZE`); None for the original files. Such
    shards only serve a data module with the same output size and aspect."""
    version: int = MANIFEST_VERSION
    """Format version."""

    def to_json(self) -> str:
        """Stable, human-readable JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse a manifest dict (as written by `to_json`)."""
        if data.get("version") not in READABLE_MANIFEST_VERSIONS:
            raise ValueError(
                f"manifest version {data.get('version')} is not one of {READABLE_MANIFEST_VERSIONS}; "
                "re-run the converter"
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
            pre_resized=data.get("pre_resized"),
            version=data["version"],
        )


def read_manifest(folder: str | Path) -> Manifest:
    """Read `<folder>/manifest.json`; the error names the converter when it is missing."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the shards with `python -m llava_lit.convert`")
    return Manifest.from_dict(json.loads(path.read_text()))


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write `manifest.json` into `folder` atomically (a reader never sees half a manifest)."""
    return atomic_write_text(Path(folder) / MANIFEST_NAME, manifest.to_json())


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
        """Finish the current shard and record its size in bytes."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self.shards[-1].size_bytes = os.path.getsize(self.out_dir / self.shards[-1].name)


def iter_raw_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one shard: `{"__key__", "json": bytes, "<ext>": bytes, ...}` in tar order."""
    with open(path, "rb") as stream:
        files = ({**f, "__url__": str(path)} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)


def _is_complete(raw: dict[str, Any]) -> bool:
    """Whether a raw sample has its `json` member and every image member its record lists."""
    if "json" not in raw:
        return False
    try:
        keys = json.loads(raw["json"].decode("utf-8")).get("image_keys", [])
    except (ValueError, AttributeError):
        return True  # a malformed record, not a cut tar: left to the decoder, which counts it
    return not isinstance(keys, list) or all(not isinstance(k, str) or k in raw for k in keys)


def iter_complete_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """`iter_raw_samples`, less a last sample that lacks members (a tar cut between one sample's members).

    Only the last sample can be cut: every earlier one was followed by the next sample's members. A read error
    is raised after the samples read before it.
    """
    held: dict[str, Any] | None = None
    try:
        for raw in iter_raw_samples(path):
            if held is not None:
                yield held
            held = raw
    except SHARD_READ_ERRORS:
        if held is not None:
            yield held  # complete: the next sample had begun
        raise
    if held is not None and _is_complete(held):
        yield held


def parse_sample(raw: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    """Decode a raw sample explicitly: the record from JSON, and its image bytes in marker order."""
    if "json" not in raw:
        raise ValueError(f"sample {raw.get('__key__')!r} in {raw.get('__url__')} has no json member")
    record = json.loads(raw["json"].decode("utf-8"))
    images = [raw[ext] for ext in record.get("image_keys", [])]
    return record, images


@dataclass(frozen=True)
class ShardScan:
    """What a full read of one shard found."""

    num_samples: int
    """Complete samples read before the end of the tar or the first error (`iter_complete_samples`)."""
    error: str | None
    """The read error that stopped the scan (None when the tar ended cleanly)."""


def scan_shard(path: str | Path) -> ShardScan:
    """Read a whole shard and count its complete samples, stopping at the first read error, as training's
    reader does. Costs one sequential read of the shard: meant for shards whose size already shows damage.
    """
    count = 0
    try:
        for _ in iter_complete_samples(path):
            count += 1
    except SHARD_READ_ERRORS as err:
        return ShardScan(count, f"{type(err).__name__}: {err}")
    return ShardScan(count, None)


@dataclass(frozen=True)
class DamagedShard:
    """A shard whose file does not match its manifest entry, and what it still holds."""

    path: str
    """Path of the shard file."""
    expected: int
    """Samples the manifest lists for it."""
    readable: int
    """Complete samples a full read finds (0 when the file is missing)."""
    reason: str
    """`shard_short` (the tar ends early) or `shard_unreadable` (a read error stops it)."""
    detail: str
    """What was found: sizes on disk and in the manifest, and the read error."""

    @property
    def missing(self) -> int:
        """Samples of the manifest that cannot be read."""
        return max(0, self.expected - self.readable)


def find_damaged_shards(folder: str | Path, manifest: Manifest) -> list[DamagedShard]:
    """The shards of `manifest` that are missing, or whose size differs from the recorded one and that hold
    fewer complete samples than listed (each such shard is read once to count them).

    Costs one `stat` per shard when nothing is wrong. Shards of a version-1 manifest (no sizes) are only
    checked for existence; their damage shows while reading.
    """
    damaged = []
    for info in manifest.shards:
        if info.num_samples == 0:
            continue
        path = Path(folder) / info.name
        try:
            size = path.stat().st_size
        except OSError as err:
            damaged.append(DamagedShard(str(path), info.num_samples, 0, "shard_unreadable", str(err)))
            continue
        if info.size_bytes is None or size == info.size_bytes:
            continue
        scan = scan_shard(path)
        if scan.num_samples >= info.num_samples:
            continue  # a different size, but every listed sample is there
        sizes = f"{size} bytes on disk, {info.size_bytes} in the manifest"
        if scan.error is not None:
            detail = f"{sizes}; {scan.num_samples} complete samples before {scan.error}"
        else:
            detail = f"{sizes}; it ends after {scan.num_samples} samples"
        reason = "shard_unreadable" if scan.error is not None else "shard_short"
        damaged.append(DamagedShard(str(path), info.num_samples, scan.num_samples, reason, detail))
    return damaged
