"""`python -m llava_lit.convert`: an official LLaVA JSON file plus its image folder → WebDataset shards + manifest.

    python -m llava_lit.convert json=LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \\
        image_folder=LLaVA-Pretrain/images out=shards/lcs558k
    python -m llava_lit.convert json=llava_v1_5_mix665k.json image_folder=playground/data out=shards/mix665k \\
        tokenizer=lmsys/vicuna-7b-v1.5 pre_resize=336 image_aspect=pad

Settings are `key=value` overrides of `conf/convert.yaml` (Hydra; `--help` lists them with their docs, the
fields of `ConvertConfig`).

The whole input is read and parsed before anything is written: a `.json` file that does not parse is refused
with its file, line and column, and nothing is written. Each record is then validated (`records.parse_record`)
and each image fully decoded once here, so training never meets a missing or corrupt file; the records that
fail are counted per reason, listed in the manifest (file and record index or line, and id) and reported at
the end, never silently dropped. Reasons: `invalid_json` (a `.jsonl` line that does not parse),
`invalid_record`, `invalid_unicode`, `image_outside_folder` and the image reasons of
`images.IMAGE_SKIP_REASONS`.

Image paths are confined to the image folder: an absolute path, or one whose resolved form (after `..` and
symlinks) lies outside the folder, is skipped as `image_outside_folder` unless `allow_outside_image_folder`
(`allow_outside_image_folder=true`) is set, e.g. for an image folder whose subfolders are symlinks to other
disks.

The output folder is replaced as a whole and only at the end: shards and manifest are written into a hidden
temporary sibling (`atomic_files.atomic_directory`) that takes the output's name once complete, so a failure
at any point (bad input, a full disk, an interrupt) leaves the previous conversion as it was. Because the
whole folder is replaced, `out` must be new, empty, or hold only a previous conversion (`shard-*.tar`,
`manifest.json`); a folder with anything else in it is refused before any work, and so is a run in which every
record was skipped (it would replace a good conversion with an empty one).

With `pre_resize` (`pre_resize=SIZE image_aspect=MODE`) the images are stored already in the vision tower's
input geometry (aspect mode applied, CLIP shortest-edge resize + centre crop to SIZE, the resample filter of
CLIP's processor) as lossless PNG: training then skips the resize (about 0.2 ms instead of several ms an image)
and gets the same pixels, at several times the disk of the original JPEGs. The manifest records the size and
aspect mode, and a data module set up for another refuses the shards.

With `grid_pinpoints` (an AnyRes model's `model.anyres.grid_pinpoints`, with `tile_size` its tower's input side)
the length statistics count each image's tokens from its size as LLaVA-NeXT tiling lays them out
(`image_tiling.TileLayout`: `num_image_tokens` per tile, unpad and newline on), as the AnyRes data module will;
without it every image counts `num_image_tokens`.

Output is deterministic: records keep their file order, keys are their index in the file (non-blank lines for
`.jsonl`), and tars carry fixed metadata, so re-running on the same input gives byte-identical shards.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from llava_lit.atomic_files import atomic_directory
from llava_lit.conversation import get_template
from llava_lit.hydra_app import hydra_app
from llava_lit.image_tiling import AnyResSettings, TileLayout
from llava_lit.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageLoader, decode_image
from llava_lit.records import InvalidRecord, Record, parse_record
from llava_lit.shards import (
    MANIFEST_NAME,
    PRE_RESIZED_MANIFEST_VERSION,
    Manifest,
    ShardWriter,
    TokenLengthStats,
    write_manifest,
)
from llava_lit.tokenization import SkipSample, encode_conversation

log = logging.getLogger(__name__)

MAX_EXAMPLES_PER_REASON = 20
"""How many skipped records the manifest lists per reason."""

PREVIOUS_OUTPUT = re.compile(r"shard-\d{6,}\.tar|" + re.escape(MANIFEST_NAME))
"""Names a previous conversion leaves in its output folder: the only entries `out` may hold."""

_T = TypeVar("_T")
_R = TypeVar("_R")


class ConvertError(ValueError):
    """Input or output the converter refuses as a whole; nothing has been written when it is raised."""


@dataclass(frozen=True)
class SourceEntry:
    """One entry of the input file, as read: its place in the file and its parsed JSON value."""

    where: str
    """Where it is, for reports: `data.json[12]` (index in a JSON list) or `data.jsonl:13` (line number)."""
    raw: Any
    """The parsed JSON value (None when it did not parse)."""
    error: InvalidRecord | None = None
    """Why the entry could not even be parsed (a `.jsonl` line that is not JSON), else None."""


def _line_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of byte `offset` in `data`."""
    return data.count(b"\n", 0, offset) + 1, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def load_records(json_path: str | Path) -> list[SourceEntry]:
    """Read a LLaVA JSON list (`.json`) or one record per line (`.jsonl`), in file order.

    A `.json` file that is not valid UTF-8 JSON, or not a list, raises `ConvertError` naming the file, line
    and column. In a `.jsonl` file, blank lines are passed over (but counted in line numbers) and a line that
    does not parse becomes an entry with an `invalid_json` error, so it is counted and skipped like a bad
    record.
    """
    path = Path(json_path)
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(data.split(b"\n"), start=1):
            where = f"{path.name}:{number}"
            if not line.strip():
                continue
            try:
                entries.append(
                    SourceEntry(where, json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8")))
                )
            except UnicodeDecodeError as err:
                problem = InvalidRecord("invalid_json", f"not UTF-8 at column {err.start + 1}")
                entries.append(SourceEntry(where, None, problem))
            except json.JSONDecodeError as err:
                problem = InvalidRecord("invalid_json", f"{err.msg} at column {err.colno}")
                entries.append(SourceEntry(where, None, problem))
        return entries
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, column = _line_column(data, err.start)
        raise ConvertError(f"{path}:{line}:{column}: not UTF-8 ({err.reason})") from None
    del data  # a LLaVA JSON file can be a gigabyte: keep one copy of it, not two
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConvertError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(records, list):
        raise ConvertError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return [SourceEntry(f"{path.name}[{index}]", raw) for index, raw in enumerate(records)]


def _member_extension(path: str, index: int, count: int) -> str:
    """Shard member key for an image: its lower-case extension, numbered when the sample has several."""
    ext = Path(path).suffix.lower().lstrip(".") or "img"
    return ext if count == 1 else f"{index}.{ext}"


def image_path(folder: Path, rel: str, *, allow_outside: bool = False) -> Path:
    """The file a record's image path names, refused (`InvalidRecord("image_outside_folder")`) when it is not
    inside `folder`: an absolute path, or one whose resolved form (`..` and symlinks followed) leaves it.

    `folder` must be resolved already. With `allow_outside`, the path is taken as it is (joined to `folder`).
    A symlink loop raises `ImageDecodeError("image_missing")`.
    """
    joined = folder / rel
    if allow_outside:
        return joined
    if PurePath(rel).is_absolute():
        raise InvalidRecord("image_outside_folder", f"{rel}: an absolute path")
    try:
        resolved = joined.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise ImageDecodeError("image_missing", f"{rel}: {err}") from None
    if not resolved.is_relative_to(folder):
        raise InvalidRecord("image_outside_folder", f"{rel}: resolves to a file outside the image folder")
    return resolved


def pre_resize_loader(size: int, aspect: str) -> ImageLoader:
    """The image path `pre_resize` stores: CLIP's processor geometry at `size` px in `aspect` mode, uint8."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if aspect == "anyres":
        raise ValueError(
            "pre_resize stores one tower-size view per image, but AnyRes tiles are cut from the image at its own "
            "size: convert without pre_resize for image_aspect=anyres"
        )
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return ImageLoader(processor, aspect=aspect)  # type: ignore[arg-type]


def _png(pixels: Any) -> bytes:
    """uint8 [3, H, W] pixels as PNG bytes (lossless; fast compression)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _load_images(
    record: Record,
    image_folder: Path,
    max_pixels: int,
    allow_outside: bool,
    pre_resize: ImageLoader | None = None,
) -> tuple[dict[str, bytes], list[str], list[tuple[int, int]]]:
    """Read and fully decode every image of a record (and, with `pre_resize`, store it in that geometry as PNG);
    raise `ImageDecodeError` or `InvalidRecord` at the first bad one. Returns the bytes to store by member key,
    the keys in image order and each image's (height, width) as read."""
    images: dict[str, bytes] = {}
    keys: list[str] = []
    sizes: list[tuple[int, int]] = []
    for i, rel in enumerate(record.images):
        path = image_path(image_folder, rel, allow_outside=allow_outside)
        if not path.is_file():
            raise ImageDecodeError("image_missing", rel)
        data = path.read_bytes()
        try:
            image = decode_image(data, max_pixels=max_pixels)
        except ImageDecodeError as err:
            raise ImageDecodeError(err.reason, f"{rel}: {err.detail}" if err.detail else rel) from err
        sizes.append((image.height, image.width))
        if pre_resize is not None:
            data = _png(pre_resize.pixels(image))
            rel = str(Path(rel).with_suffix(".png"))
        key = _member_extension(rel, i, len(record.images))
        images[key] = data
        keys.append(key)
    return images, keys, sizes


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[_T], _R], items: Iterable[_T], window: int
) -> Iterator[_R]:
    """`pool.map(fn, items)` with at most `window` items in flight: the results waiting to be written (image
    bytes) stay bounded, and when the consumer stops (an error while writing) no further item is started."""
    pending: deque[Future[_R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that holds anything but a previous conversion (it is replaced as a whole)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConvertError(f"out={out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if not (PREVIOUS_OUTPUT.fullmatch(p.name) and p.is_file()))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConvertError(
            f"out={out} holds files that are not a previous conversion ({listed}); the converter replaces "
            "the whole folder, so give it a new or empty folder (or one holding only shard-*.tar and "
            f"{MANIFEST_NAME})"
        )


def _describe(entry: SourceEntry, error: InvalidRecord | ImageDecodeError) -> str:
    """A skipped entry for reports: where it is in the file, its id when it has one, and what is wrong."""
    raw = entry.raw
    record_id = f" (id {raw['id']!r:.80})" if isinstance(raw, dict) and "id" in raw else ""
    text = f"{entry.where}{record_id}: {error.detail or error.reason}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # JSON-safe even with lone surrogates


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
    allow_outside_image_folder: bool = False,
    pre_resize: int | None = None,
    image_aspect: str = "pad",
    tile_layout: TileLayout | None = None,
    progress: bool = True,
) -> Manifest:
    """Convert one LLaVA JSON + image folder into `out_dir/shard-*.tar` + `out_dir/manifest.json`.

    With a tokenizer, the manifest also holds token-length statistics for `template` (with `system_prompt` in
    place of its own, when given; image markers expanded to `num_image_tokens`, or with `tile_layout` to each
    image's AnyRes token count) and how many samples that template would skip. `out_dir` is replaced as a whole
    once the new shards and manifest are complete (see the module docstring for what it may hold and what is
    refused with `ConvertError`). With `pre_resize`, images are stored resized to that many pixels square in
    `image_aspect` mode (see the module docstring). Returns the manifest.
    """
    out = Path(out_dir).resolve()  # a symlinked `out`: the folder it points to is replaced, the link stays
    check_out_dir(out)
    chat_template = get_template(template, system=system_prompt)
    entries = load_records(json_path)
    source = source or Path(json_path).stem
    folder = Path(image_folder).resolve()
    resizer = pre_resize_loader(pre_resize, image_aspect) if pre_resize is not None else None
    if tile_layout is not None and resizer is not None:
        raise ConvertError(
            "tile_layout counts tokens from each image's own size: it cannot go with pre_resize"
        )

    def check(
        index: int,
    ) -> tuple[int, InvalidRecord | ImageDecodeError | None, Record | None, dict, list, list]:
        entry = entries[index]
        try:
            if entry.error is not None:
                raise entry.error
            record = parse_record(entry.raw)
            images, keys, sizes = _load_images(
                record, folder, max_pixels, allow_outside_image_folder, resizer
            )
        except (InvalidRecord, ImageDecodeError) as err:
            return index, err, None, {}, [], []
        return index, None, record, images, keys, sizes

    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    token_lengths: list[int] = []
    token_skips: Counter[str] = Counter()
    threads = max(1, num_threads)
    with atomic_directory(out) as temp:
        writer = ShardWriter(temp, samples_per_shard)
        # Threads overlap file reads and decodes; results come back in file order, so the output stays
        # deterministic.
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = _ordered_map(pool, check, range(len(entries)), window=8 * threads)
            for index, error, record, images, keys, sizes in tqdm(
                results, total=len(entries), desc=f"convert {source}", disable=not progress, unit="rec"
            ):
                if error is not None:
                    skipped[error.reason] += 1
                    if len(examples.setdefault(error.reason, [])) < MAX_EXAMPLES_PER_REASON:
                        examples[error.reason].append(_describe(entries[index], error))
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
                            num_image_tokens=(
                                [tile_layout.num_tokens(h, w) for h, w in sizes]
                                if tile_layout is not None
                                else num_image_tokens
                            ),
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
                    token_lengths,
                    template=template,
                    num_image_tokens=num_image_tokens,
                    skipped=dict(token_skips),
                    anyres=(
                        {"grid_pinpoints": tile_layout.settings.grid_pinpoints, "tile_size": tile_layout.base}
                        if tile_layout is not None
                        else None
                    ),
                )
                if tokenizer is not None
                else None
            ),
        )
        if pre_resize is not None:
            manifest.pre_resized = {"height": pre_resize, "width": pre_resize, "aspect": image_aspect}
            manifest.version = PRE_RESIZED_MANIFEST_VERSION
        if manifest.num_samples == 0:
            raise ConvertError(
                f"{json_path}: no record could be converted ({len(entries)} read, skipped: "
                f"{manifest.skipped or 'none'}, e.g. {[e for ex in examples.values() for e in ex[:1]]}); "
                f"{out} is left as it was"
            )
        write_manifest(temp, manifest)
        check_out_dir(out)  # nothing was added to it while converting
    for reason, count in manifest.skipped.items():
        log.warning("%s: skipped %d records (%s), e.g. %s", source, count, reason, examples[reason][:3])
    return manifest


@dataclass
class ConvertConfig:
    """Settings of `python -m llava_lit.convert` (the keys of `conf/convert.yaml`)."""

    json: str
    """LLaVA JSON list (or .jsonl) of records."""
    image_folder: str
    """Folder the records' `image` paths are relative to."""
    out: str
    """Output folder for shard-*.tar and manifest.json (new, empty, or a previous conversion: it is replaced)."""
    shard_size: int = 1000
    """Samples per shard."""
    tokenizer: str | None = None
    """Tokenizer (hub id or folder) for the manifest's token-length statistics; null = no statistics."""
    template: str = "vicuna_v1"
    """Chat template for the length statistics."""
    system_prompt: str | None = None
    """System prompt replacing the template's for the length statistics; null keeps the template's."""
    num_image_tokens: int = 576
    """Tokens per image for the length statistics (per tile with `grid_pinpoints`: a square number)."""
    max_length: int = 2048
    """Model max length for the length statistics (longer samples are counted as skipped)."""
    source: str | None = None
    """Source name recorded in every sample; null = the JSON file's stem."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are skipped (`image_too_large`) before they are decoded."""
    num_threads: int = 4
    """Threads reading and verifying images."""
    pre_resize: int | None = None
    """Store images already resized to this many pixels square (the vision tower's input size) in
    `image_aspect` mode, as PNG; training with another size or aspect refuses the shards. null = as read."""
    image_aspect: str = "pad"
    """Aspect mode for `pre_resize`: pad, crop or resize."""
    grid_pinpoints: list[list[int]] | None = None
    """AnyRes resolutions ([height, width], the model's `model.anyres.grid_pinpoints`) for the length statistics:
    each image counts the tokens LLaVA-NeXT tiling gives its size; null = `num_image_tokens` per image."""
    tile_size: int = 336
    """The vision tower's input side (the AnyRes tile) for `grid_pinpoints`."""
    allow_outside_image_folder: bool = False
    """Read image paths that are absolute or resolve outside `image_folder` (through '..' or a symlink); without
    it such records are skipped as image_outside_folder."""


def anyres_layout(grid_pinpoints: list[list[int]], tile_size: int, num_image_tokens: int) -> TileLayout:
    """The AnyRes layout the length statistics count with: `num_image_tokens` per tile (a square number, the
    tower's feature grid) on `tile_size` tiles. Settings that do not make one end the program with the reason."""
    grid = math.isqrt(num_image_tokens)
    if grid * grid != num_image_tokens:
        raise SystemExit(
            f"error: grid_pinpoints needs num_image_tokens to be the tokens of one tile, a square number "
            f"(576 for CLIP-L/14-336); got {num_image_tokens}"
        )
    try:
        return TileLayout(AnyResSettings(grid_pinpoints=grid_pinpoints), base=tile_size, feature_grid=grid)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


@hydra_app("convert", schemas={"": ConvertConfig})
def main(cfg: DictConfig) -> Manifest:
    """CLI entry point: convert, then print the manifest summary and the skip report.

    `cfg` holds the keys of `ConvertConfig` (type-checked against it). Input or output the converter refuses
    (`ConvertError`) ends the program with its message and status 1.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args: ConvertConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ConvertConfig), cfg))  # type: ignore[assignment]
    tile_layout = None
    if args.grid_pinpoints is not None:
        tile_layout = anyres_layout(args.grid_pinpoints, args.tile_size, args.num_image_tokens)
    tokenizer = None
    if args.tokenizer:
        from llava_lit.tokenization import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    try:
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
            allow_outside_image_folder=args.allow_outside_image_folder,
            pre_resize=args.pre_resize,
            image_aspect=args.image_aspect,
            tile_layout=tile_layout,
        )
    except ConvertError as err:
        raise SystemExit(f"error: {err}") from None
    print(
        f"{manifest.num_samples} samples ({manifest.num_image_samples} with images, "
        f"{manifest.num_text_samples} text-only) in {len(manifest.shards)} shards -> {args.out}"
    )
    print(f"skipped: {manifest.skipped or 'none'}")
    if manifest.token_lengths is not None:
        t = manifest.token_lengths
        counted = "AnyRes tiles" if t.anyres else f"{t.num_image_tokens} per image"
        print(
            f"tokens ({counted}): mean {t.mean} p50 {t.p50} p95 {t.p95} max {t.max}; "
            f"would skip {t.skipped or 'none'}"
        )
    return manifest


if __name__ == "__main__":
    main()
