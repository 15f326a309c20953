"""`LlavaDataModule`: streams WebDataset shards into padded batches with exact, equal per-rank epochs.

Each epoch is planned from the manifests alone: every source's shard list is shuffled with `(seed, epoch)`,
repeated or cut to its mixing weight, and the sources' shards are interleaved. The plan is one list of
`(shard, first sample, end sample)` segments; rank r of W takes the r-th of W equal contiguous ranges of it,
and worker k of that rank the k-th sub-range. So every rank gets exactly the same number of samples and
batches (uneven splits hang DDP), no sample is read twice in an epoch, several ranks or workers may share
one shard (fewer shards than workers is fine), and the epoch length is known in `setup()` without scanning.

Inside a worker, raw samples pass a seeded shuffle buffer, then are decoded explicitly (JSON, PIL), encoded
(`tokenization.encode_conversation`) and batched (`collate.collate`). With `group_by_length`, the samples of
each optimizer step (its accumulated micro-batches) are sorted by length before they are cut into
micro-batches: the step sees the same samples, padded less; `length_group_steps` sorts several steps' samples
together (for runs without accumulation). With `packing`, the same groups' samples are packed into rows of
up to `max_length` tokens and dealt out to the same number of micro-batches (`llava_lit.packing`,
`collate.collate_packed`), so batch counts, equal ranks and resume are those of an unpacked run. The training
loader stamps every micro-batch with the supervised-token count of its optimizer step on this rank, so the
loss can be the mean over all the step's tokens (`module.LlavaLitModule.training_step`). A sample that must be
skipped (no buildable mask, undecodable image) is counted per reason and logged; to keep batch counts equal the
worker then repeats one of its earlier samples at the end of its share (counted as `repeated_to_fill` and logged).

Shards are checked against their manifest. In `setup()`, every shard's size is compared with the recorded one
(one `stat` each) and a shard that differs or is missing is read once to count what it still holds. While
reading, each segment's samples are counted: a shard that ends before the segment does loses the rest
(`shard_short`), a read error (cut or corrupt tar, I/O error) loses the rest of the segment
(`shard_unreadable`); either is logged with the shard's path and counted in `skip_counts`. These losses, and
only these, are bounded by `max_lost_fraction` (see `LlavaDataModule`); past it the run stops with
`DataLossError`, naming the shards and counts.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from llava_lit.collate import collate, collate_packed, supervised_tokens
from llava_lit.constants import STEP_TOKENS_KEY
from llava_lit.conversation import ChatTemplate, get_template
from llava_lit.image_tiling import TileLayout
from llava_lit.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SKIP_REASONS,
    ImageDecodeError,
    ImageLoader,
    processor_output_size,
)
from llava_lit.packing import pack_into_batches
from llava_lit.shards import (
    SHARD_LOSS_REASONS,
    SHARD_READ_ERRORS,
    DamagedShard,
    find_damaged_shards,
    iter_complete_samples,
    parse_sample,
    read_manifest,
)
from llava_lit.tokenization import SKIP_REASONS, SkipSample, encode_conversation

log = logging.getLogger(__name__)

COUNTER_KEYS = (*SKIP_REASONS, *IMAGE_SKIP_REASONS, "bad_sample", *SHARD_LOSS_REASONS, "repeated_to_fill")
"""Keys of `LlavaDataModule.skip_counts`: every skip reason, samples lost to damaged shards, plus samples
repeated to keep ranks equal."""

DEFAULT_MAX_LOST_FRACTION = 0.01
"""Default bound on samples lost to damaged shards, per rank and epoch (see `LlavaDataModule`)."""


class DataLossError(RuntimeError):
    """More samples lost to damaged shards than `max_lost_fraction` allows; the message names the shards."""


@dataclass(frozen=True)
class Segment:
    """Samples `[start, stop)` (in tar order) of one shard."""

    path: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Source:
    """One shard folder in a mix."""

    name: str
    """Source name (from the manifest)."""
    weight: float
    """Per-epoch multiplier of the source's samples: 1 = each once, 0.5 = a fresh random half, 2 = twice."""
    shards: tuple[tuple[str, int], ...]
    """(shard path, sample count) pairs."""

    @property
    def num_samples(self) -> int:
        return sum(count for _, count in self.shards)

    @property
    def epoch_samples(self) -> int:
        return round(self.weight * self.num_samples)


def plan_epoch(sources: Sequence[Source], *, seed: int, epoch: int, shuffle: bool) -> list[Segment]:
    """The epoch's ordered segments: each source repeated/cut to its weight, shards shuffled and interleaved."""
    rng = random.Random(seed * 1_000_003 + epoch)
    segments: list[Segment] = []
    for source in sources:
        wanted = source.epoch_samples
        while wanted > 0:
            order = list(source.shards)
            if shuffle:
                rng.shuffle(order)
            for path, count in order:
                take = min(count, wanted)
                if take > 0:
                    segments.append(Segment(path, 0, take))
                wanted -= take
    if shuffle:
        rng.shuffle(segments)
    return segments


def slice_segments(segments: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """The segments covering positions `[start, stop)` of the concatenated plan, cut at the ends."""
    out = []
    position = 0
    for seg in segments:
        lo, hi = max(start, position), min(stop, position + len(seg))
        if lo < hi:
            out.append(Segment(seg.path, seg.start + lo - position, seg.start + hi - position))
        position += len(seg)
        if position >= stop:
            break
    return out


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """`[start, stop)` of part `index` when `total` items are split into `parts` near-equal contiguous parts."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class SkipCounter:
    """Per-reason counters shared by the DataLoader workers and the main process (a shared-memory array)."""

    def __init__(self) -> None:
        self._values = multiprocessing.get_context().Array("q", len(COUNTER_KEYS))

    def add(self, key: str, count: int = 1) -> None:
        with self._values.get_lock():
            self._values[COUNTER_KEYS.index(key)] += count

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in zip(COUNTER_KEYS, self._values[:], strict=True)}

    def total(self, keys: Iterable[str]) -> int:
        """Sum of the counters of `keys`."""
        values = self.as_dict()
        return sum(values[k] for k in keys)

    def reset(self) -> None:
        """Set every counter to zero."""
        with self._values.get_lock():
            self._values[:] = [0] * len(COUNTER_KEYS)

    def __getstate__(self) -> dict[str, Any]:
        # The array can only travel to a process being started (a DataLoader worker); any other copy (a deepcopy,
        # a checkpoint) gets fresh local counters instead of a pickling error.
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"_values": self._values}
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_values" in state:
            self._values = state["_values"]
        else:
            self.__init__()


@dataclass
class SampleEncoder:
    """Raw shard sample → training sample (`id`, `input_ids`, `labels`, `pixel_values` or None, and with AnyRes
    tiling `image_sizes`)."""

    tokenizer: PreTrainedTokenizerBase
    image_loader: ImageLoader
    template: ChatTemplate
    num_image_tokens: int
    max_length: int

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        record, image_bytes = parse_sample(raw)
        if self.image_loader.tile_layout is not None:
            return self._encode_tiled(record, image_bytes)
        # Tokenize first: it is cheap, and a skipped sample then costs no image decode.
        encoded = encode_conversation(
            record["conversations"],
            tokenizer=self.tokenizer,
            template=self.template,
            num_image_tokens=self.num_image_tokens,
            max_length=self.max_length,
            num_images=len(image_bytes),
        )
        pixel_values = torch.stack([self.image_loader(b) for b in image_bytes]) if image_bytes else None
        return {
            "id": str(record["id"]),
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": pixel_values,  # [n_images, 3, H, W] or None
        }

    def _encode_tiled(self, record: dict[str, Any], image_bytes: list[bytes]) -> dict[str, Any]:
        """AnyRes: each image's size sets its token count, so the images are decoded before tokenizing."""
        layout = self.image_loader.tile_layout
        images = [self.image_loader.decode(b) for b in image_bytes]
        sizes = [(image.height, image.width) for image in images]
        encoded = encode_conversation(
            record["conversations"],
            tokenizer=self.tokenizer,
            template=self.template,
            num_image_tokens=[layout.num_tokens(h, w) for h, w in sizes],
            max_length=self.max_length,
            num_images=len(image_bytes),
        )
        tiles = [self.image_loader.pixels(image) for image in images]  # each [1 + tiles, 3, H, W]
        return {
            "id": str(record["id"]),
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": torch.cat(tiles) if tiles else None,  # [sum of tiles, 3, H, W] or None
            "image_sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2),  # [n_images, 2] (height, width)
        }


@dataclass
class CachingEncoder:
    """An encoder that keeps each encoded sample in memory, so the epochs after the first skip tokenizing and
    decoding it. For data that fits in RAM and is read in the training process (`num_workers=0`): the world's
    stage 2 spends about 14 % of each step encoding, all of it repeated work from the second epoch on.

    Samples are keyed by shard and sample key; skipped samples are not cached, so they are skipped (and
    counted) again each epoch, as without the cache. Batches are built by `collate` into new tensors, so the
    cached ones are never modified.
    """

    encoder: Callable[[dict[str, Any]], dict[str, Any]]
    cache: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = (str(raw.get("__url__")), str(raw.get("__key__")))
        sample = self.cache.get(key)
        if sample is None:
            sample = self.cache[key] = self.encoder(raw)
        return sample


class ShardStream(IterableDataset):
    """Batches of one rank's share of an epoch plan, split over the DataLoader's workers."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        encoder: Callable[[dict[str, Any]], dict[str, Any]],
        pad_token_id: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        counter: SkipCounter,
        length_group: int = 1,
        mix_group_batches: bool = False,
        max_lost_fraction: float = DEFAULT_MAX_LOST_FRACTION,
        pack_length: int | None = None,
    ) -> None:
        self.sources = list(sources)
        self.encoder = encoder
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.counter = counter
        if length_group < 1:
            raise ValueError(f"length_group must be >= 1 batch, got {length_group}")
        self.length_group = length_group
        """Consecutive batches of a worker whose samples are sorted by length before batching (1 = stream order)."""
        self.mix_group_batches = mix_group_batches
        """Deliver each group's batches in a seeded random order instead of shortest first (groups that span
        several optimizer steps: otherwise every group would run from short to long batches)."""
        self.epoch = 0
        self.resume_batches = 0
        """Batches of the current epoch already consumed before a mid-epoch resume; skipped on the next pass."""
        self.num_workers = 1
        """Set by the DataModule to the DataLoader's worker count, so `len()` is right before iterating."""
        self.pack_length = pack_length
        """Pack each group's samples into rows of at most this many tokens (`llava_lit.packing`), dealt out to
        the group's batches; None = one sample per row."""
        self.max_lost_fraction = max_lost_fraction
        """Most samples of this rank's epoch share that damaged shards may lose before `DataLossError`."""
        self.epoch_losses = SkipCounter()
        """Samples this rank lost to damaged shards in the current epoch, over all its workers."""

    @property
    def epoch_samples(self) -> int:
        """Samples in one epoch over all ranks (before the equal split)."""
        return sum(s.epoch_samples for s in self.sources)

    @property
    def rank_samples(self) -> int:
        """Samples this rank yields per epoch (the same on every rank)."""
        return self.epoch_samples // self.world_size

    def __len__(self) -> int:
        """Batches this rank yields per epoch: each worker batches its own share, the last batch may be short."""
        return sum(self.worker_batches(max(1, self.num_workers)))

    @property
    def max_lost(self) -> int:
        """Samples this rank may lose to damaged shards per epoch (`max_lost_fraction` of its share)."""
        return math.floor(self.max_lost_fraction * self.rank_samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next iteration reads, and start its loss count afresh."""
        self.epoch = epoch
        self.epoch_losses.reset()

    def worker_batches(self, num_workers: int) -> list[int]:
        """Batches each worker yields this epoch."""
        return [
            math.ceil((hi - lo) / self.batch_size)
            for lo, hi in (split_range(self.rank_samples, num_workers, w) for w in range(num_workers))
        ]

    def consumed_by_worker(self, consumed: int, num_workers: int) -> list[int]:
        """How many of the first `consumed` batches each worker produced.

        The DataLoader takes batches from its workers in turn, passing over exhausted ones, so the split is
        a round-robin over each worker's batch count.
        """
        remaining = self.worker_batches(num_workers)
        taken = [0] * num_workers
        while consumed > 0 and any(remaining):
            for w in range(num_workers):
                if consumed and remaining[w]:
                    taken[w] += 1
                    remaining[w] -= 1
                    consumed -= 1
        return taken

    def worker_segments(self, worker: int, num_workers: int) -> list[Segment]:
        """The segments read by `worker` of this rank in the current epoch."""
        plan = plan_epoch(self.sources, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        rank_lo = self.rank * self.rank_samples
        lo, hi = split_range(self.rank_samples, num_workers, worker)
        return slice_segments(plan, rank_lo + lo, rank_lo + hi)

    def _read_segments(self, segments: Sequence[Segment], worker: int) -> Iterator[dict[str, Any]]:
        """The raw samples of `segments` in order; samples the shards fail to deliver are counted as lost.

        Per segment: a shard that ends before `stop` loses the rest (`shard_short`; a last sample cut between
        its members counts among them); a read error loses the rest of the segment (`shard_unreadable`).
        """
        lost: dict[str, Counter[str]] = {}
        for seg in segments:
            position = 0  # samples of the shard passed so far, in tar order
            try:
                for raw in iter_complete_samples(seg.path):
                    if position >= seg.stop:
                        break
                    position += 1
                    if position > seg.start:
                        yield raw
            except SHARD_READ_ERRORS as err:
                missing = seg.stop - max(position, seg.start)
                self._lose(seg, "shard_unreadable", missing, f"{type(err).__name__}: {err}", worker, lost)
                continue
            if position < seg.stop:
                missing = seg.stop - max(position, seg.start)
                detail = f"the shard ends after {position} samples, the segment needs {seg.stop}"
                self._lose(seg, "shard_short", missing, detail, worker, lost)

    def _lose(
        self, seg: Segment, reason: str, count: int, detail: str, worker: int, lost: dict[str, Counter[str]]
    ) -> None:
        """Count and log `count` samples of `seg` lost to its shard; raise `DataLossError` past the bound."""
        self.counter.add(reason, count)
        self.epoch_losses.add(reason, count)
        lost.setdefault(seg.path, Counter())[reason] += count
        log.warning(
            "rank %d worker %d: lost %d samples of shard %s (samples %d-%d, %s): %s",
            self.rank,
            worker,
            count,
            seg.path,
            seg.start,
            seg.stop - 1,
            reason,
            detail,
        )
        total = self.epoch_losses.total(SHARD_LOSS_REASONS)
        if total > self.max_lost:
            shards = "; ".join(f"{path}: {dict(c)}" for path, c in lost.items())
            raise DataLossError(
                f"rank {self.rank}: damaged shards lost {total} of the {self.rank_samples} samples of this "
                f"rank's epoch {self.epoch}, more than max_lost_fraction={self.max_lost_fraction} allows "
                f"({self.max_lost}). Shards of worker {worker}: {shards}. Convert the source again (or copy "
                "the shards again), or raise data.max_lost_fraction to train without these samples"
            )

    def _raw_samples(
        self, segments: Sequence[Segment], rng: random.Random, worker: int = 0
    ) -> Iterator[dict[str, Any]]:
        samples = self._read_segments(segments, worker)
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for raw in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            k = rng.randrange(len(buffer))
            buffer[k], raw = raw, buffer[k]
            yield raw
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        segments = self.worker_segments(worker, num_workers)
        rng = self._rng(worker)
        # Resuming mid-epoch: the groups this worker already delivered in full are passed over as raw samples
        # (the shuffle buffer still sees them, so the order is the one of the interrupted run, but nothing is
        # decoded); of the group it was in, the batches it delivered are rebuilt and dropped. Exact unless
        # samples were skipped in that part, which shifts batch boundaries slightly.
        consumed = self.consumed_by_worker(self.resume_batches, num_workers)[worker]
        done_groups, done_batches = divmod(consumed, self.length_group)
        group_samples = self.length_group * self.batch_size
        samples = self._good_samples(segments, rng, worker, skip=done_groups * group_samples)
        for index, group in enumerate(_chunks(samples, group_samples), start=done_groups):
            batches = self._group_batches(group)
            if self.mix_group_batches:  # seeded by the group, so a resumed run rebuilds the same order
                self._rng(worker, index).shuffle(batches)
            for batch in batches[done_batches if index == done_groups else 0 :]:
                yield (
                    collate_packed(batch, self.pad_token_id)
                    if self.pack_length
                    else collate(batch, self.pad_token_id)
                )

    def _rng(self, worker: int, *parts: int) -> random.Random:
        """A random stream fixed by (seed, epoch, rank, worker, *parts): the same in a resumed run."""
        return random.Random(hash((self.seed, self.epoch, self.rank, worker, *parts)) & 0xFFFFFFFF)

    def _good_samples(
        self, segments: Sequence[Segment], rng: random.Random, worker: int, skip: int
    ) -> Iterator[dict[str, Any]]:
        """The worker's encoded samples after the first `skip`; skipped ones are counted and replaced at the end."""
        share = sum(len(s) for s in segments)
        produced: list[dict[str, Any]] = []
        logged: dict[str, int] = {}
        good = skip
        for raw in self._raw_samples(segments, rng, worker):
            if skip:
                skip -= 1
                continue
            try:
                sample = self.encoder(raw)
            except (SkipSample, ImageDecodeError) as err:
                self._count_skip(err.reason, raw, err, logged)
                continue
            except (ValueError, KeyError, UnicodeDecodeError) as err:  # malformed record JSON in a shard
                self._count_skip("bad_sample", raw, err, logged)
                continue
            good += 1
            if len(produced) < self.batch_size:
                produced.append(sample)
            yield sample
        # To keep batch counts equal across ranks, repeat earlier samples in place of the skipped ones.
        missing = share - good
        if missing > 0:
            if not produced:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: all {share} samples of its share were skipped "
                    f"({self.counter.as_dict()}); the data or the template/tokenizer are wrong"
                )
            self.counter.add("repeated_to_fill", missing)
            log.warning(
                "rank %d worker %d: %d of its %d samples were skipped or lost; repeating %d earlier samples "
                "to keep batch counts equal across ranks (counted as repeated_to_fill)",
                self.rank,
                worker,
                missing,
                share,
                missing,
            )
            for k in range(missing):
                yield produced[k % len(produced)]

    def _group_batches(self, group: list[dict[str, Any]]) -> list[list[Any]]:
        """Cut one group of samples into batches, sorted by length first when groups span several batches.

        Packing: the group's samples packed into rows and dealt out to as many batches as it would have
        without packing (each batch a list of rows, each row a list of samples)."""
        if self.pack_length:
            num_batches = math.ceil(len(group) / self.batch_size)
            lengths = [len(sample["input_ids"]) for sample in group]
            plan = pack_into_batches(lengths, self.pack_length, num_batches)
            return [[[group[i] for i in row] for row in batch] for batch in plan]
        if self.length_group > 1:
            group = sorted(group, key=lambda sample: len(sample["input_ids"]))
        return list(_chunks(group, self.batch_size))

    def _count_skip(self, reason: str, raw: dict[str, Any], err: Exception, logged: dict[str, int]) -> None:
        self.counter.add(reason)
        logged[reason] = logged.get(reason, 0) + 1
        n = logged[reason]
        if n <= 3 or (n & (n - 1)) == 0:  # the first few, then at powers of two
            log.warning("skipped sample %s (%s, #%d in this worker): %s", raw.get("__key__"), reason, n, err)


def _distributed_ranks() -> tuple[int, int]:
    """(number of ranks, this rank) from torch.distributed when initialised, else the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


WORKER_SIGNAL_GRACE_S = 30.0
"""How long a DataLoader worker keeps serving batches after a preemption signal (SLURM's default `KillWait`:
after it the scheduler kills every process anyway)."""


@dataclass(frozen=True)
class _WorkerInit:
    """DataLoader worker start-up: outlive a preemption signal for a while, then Lightning's worker seeding.

    A scheduler signals every process of a job. The training process saves a checkpoint at its next optimizer
    step (`llava_lit.preemption`) and then shuts its workers down, so a worker must keep serving batches until
    then instead of dying at once (PyTorch's SIGCHLD handler would fail the training process mid-step, before
    it saves). The signal is not ignored for good either: when the DataLoader itself is shutting its workers
    down (its `done_event` is set) the worker exits at once, and otherwise `WORKER_SIGNAL_GRACE_S` after the
    signal (a process that exits without shutting its workers down terminates them with SIGTERM and waits for
    them). A worker also exits by itself when the training process is gone (PyTorch's worker watchdog).
    """

    rank: int

    def __call__(self, worker_id: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, _exit_after_grace)
        if int(os.environ.get("PL_SEED_WORKERS", 0)):  # what Lightning installs when no worker_init_fn is set
            pl_worker_init_function(worker_id, rank=self.rank)


def _exit_after_grace(signum: int, frame: Any) -> None:
    if _loader_shutting_down(frame):
        os._exit(128 + signum)
    timer = threading.Timer(WORKER_SIGNAL_GRACE_S, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    signal.signal(signum, signal.SIG_IGN)  # one timer per signal


def _loader_shutting_down(frame: Any) -> bool:
    """Whether the DataLoader is shutting this worker down: the `done_event` of PyTorch's worker loop, found
    on the interrupted stack (False when it cannot be found: then the grace period applies)."""
    while frame is not None:
        if frame.f_code.co_name == "_worker_loop":
            done = frame.f_locals.get("done_event")
            return bool(done is not None and done.is_set())
        frame = frame.f_back
    return False


class _EpochDataLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch each time an epoch starts (Lightning only tells samplers).

    With `step_batches` set (the training loader), it reads each optimizer step's micro-batches ahead and stamps
    every one with the step's supervised-token count on this rank (`STEP_TOKENS_KEY`), which the module needs
    before the step's first backward. Steps are counted from the epoch's first batch, as Lightning's
    accumulation counts them, also after a mid-epoch resume.
    """

    epoch_fn: Callable[[], int]
    resume_fn: Callable[[], int] = staticmethod(lambda: 0)
    step_batches: int | None = None

    def __iter__(self):  # type: ignore[override]
        self.dataset.set_epoch(self.epoch_fn())
        resume = self.dataset.resume_batches = self.resume_fn()
        batches = super().__iter__()
        if self.step_batches is None:
            return batches
        return stamp_step_tokens(batches, self.step_batches, first_batch=resume)


def stamp_step_tokens(
    batches: Iterable[dict[str, Any]], step_batches: int, *, first_batch: int = 0
) -> Iterator[dict[str, Any]]:
    """`batches` with `STEP_TOKENS_KEY` added: the supervised tokens of the `step_batches`-long step each belongs
    to (steps start at the epoch's batches 0, A, 2A, ...; `first_batch` is the epoch index of the first one)."""
    iterator = iter(batches)
    position = first_batch
    while True:
        step = list(itertools.islice(iterator, step_batches - position % step_batches))
        if not step:
            return
        position += len(step)
        total = torch.tensor(sum(int(supervised_tokens(b["labels"])) for b in step))
        for batch in step:
            batch[STEP_TOKENS_KEY] = total
            yield batch


class LlavaDataModule(L.LightningDataModule):
    """Train/val dataloaders over LLaVA shards (see the module docstring for the epoch plan)."""

    def __init__(
        self,
        sources: Sequence[Mapping[str, Any]] | str,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        image_processor: Any = None,
        num_image_tokens: int | None = None,
        tile_layout: TileLayout | None = None,
        template: str = "vicuna_v1",
        system_prompt: str | None = None,
        max_length: int = 2048,
        image_aspect: str = "pad",
        image_resize: str = "pil",
        micro_batch_size: int = 16,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_shards_per_source: int = 0,
        val_sources: Sequence[Mapping[str, Any]] | str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        pin_memory: bool = True,
        group_by_length: bool = False,
        length_group_steps: int = 1,
        packing: bool = False,
        cache_samples: bool = False,
        accumulate_grad_batches: int = 1,
        max_lost_fraction: float = DEFAULT_MAX_LOST_FRACTION,
        world_size: int | None = None,
        rank: int | None = None,
    ) -> None:
        """Args:
        sources: shard folders to train on, each `{"path": folder, "weight": 1.0}` (or one folder as a string).
        tokenizer / image_processor / num_image_tokens: what the model reads its inputs with; given here or
            later through `attach_model_inputs` (the training entry point builds the data module, runs its
            `prepare_data()`, and only then the model these come from).
        tile_layout: the AnyRes tiling of an AnyRes model (`LlavaModel.tile_layout`, with `image_aspect=anyres`):
            each image's token count then follows from its size.
        template: chat template name (`plain` for stage 1, `vicuna_v1` for stage 2).
        system_prompt: replaces the template's system prompt (`""` for none); None keeps the template's.
        max_length: longest sample in tokens, image runs expanded; longer samples are truncated or skipped.
        image_aspect: `pad`, `crop`, `resize` or `anyres` (see `images.ImageLoader`).
        image_resize: `pil` (the image processor's own resize, bit for bit) or `torch` (about 3x faster, within a
            couple of 8-bit levels); see `images.ImageLoader.resize`.
        micro_batch_size: samples per batch per rank.
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: raw samples held per worker for sample-level shuffling (shards are shuffled too).
        seed: seed of the per-epoch shard order and shuffle buffers.
        val_shards_per_source: hold out the last N shards of every training source for validation.
        val_sources: separate validation shard folders (used as well as any held-out shards).
        max_pixels: images with more pixels are skipped before decoding.
        pin_memory: pin batches in page-locked memory (for GPU training).
        group_by_length: sort the samples of each optimizer step by length before cutting them into
            micro-batches, so each pads to a near-equal length while the step's samples stay a random draw
            (what LLaVA's `group_by_modality_length` achieves across GPUs). Needs gradient accumulation to
            do anything; exact when `accumulate_grad_batches` is a multiple of `num_workers`.
        length_group_steps: with `group_by_length`, sort the samples of this many optimizer steps together (the
            megabatch of HF's `LengthGroupedSampler`), so it pads less without gradient accumulation too; the
            group's batches then go to its steps in a seeded random order. 1 = each step on its own.
        packing: put several samples in each row, up to `max_length` tokens, each with its own image tokens and
            position ids restarting at 0, attention and labels never crossing a sample boundary (training only;
            validation stays one sample per row, so its loss is comparable between runs). The samples of the
            same group of micro-batches as `group_by_length` (each step's on this worker, times
            `length_group_steps`, grouped or not) are packed by first-fit decreasing and dealt out to that
            many micro-batches, so the batch counts, and with them equal ranks and exact resume, are those of
            an unpacked run. Needs an attention implementation of `packing.PACKING_ATTENTION`. A larger pool
            (`length_group_steps`) packs tighter: see `benchmarks/bench_packing.py`.
        cache_samples: keep every encoded sample (token ids, labels, image tensors) in memory after its first
            use, so later epochs skip tokenizing and decoding (`CachingEncoder`). For small datasets read with
            `num_workers=0`: worker processes are re-created each epoch and would lose the cache.
        accumulate_grad_batches: micro-batches per optimizer step on this rank; injected by the training
            entry point, which derives it from the global batch size.
        max_lost_fraction: the most samples each rank may lose per epoch to damaged shards (`shard_short`,
            `shard_unreadable`), as a fraction of its epoch share, for training and validation alike; past it
            the run stops with `DataLossError` naming the shards. Below it, the lost samples are counted per
            reason and replaced by repeats (`repeated_to_fill`). `setup()` applies the same bound to the
            damage it finds before training (shards missing, or whose size differs from the manifest), counted
            as if one rank read all of it, so a run that passes setup is not stopped later by that damage.
            Samples skipped for what they contain (mask, length, image) are not counted here: they are
            properties of the data, counted by the converter's manifest and in `skip_counts`. The default,
            0.01, lets a run go on past one damaged shard among a few hundred (loudly) and stops one whose
            copy of the data is broken on a larger scale; 0 stops at the first lost sample.
        world_size / rank: override the distributed layout (default: the trainer, torch.distributed, env).
        """
        super().__init__()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.tile_layout = tile_layout
        self.source_specs = _as_specs(sources)
        self.val_specs = _as_specs(val_sources) if val_sources else []
        self.template = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.image_aspect = image_aspect
        self.image_resize = image_resize
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_shards_per_source = val_shards_per_source
        self.max_pixels = max_pixels
        self.pin_memory = pin_memory
        self.group_by_length = group_by_length
        if length_group_steps < 1:
            raise ValueError(f"length_group_steps must be >= 1, got {length_group_steps}")
        self.length_group_steps = length_group_steps
        self.packing = packing
        if cache_samples and num_workers > 0:
            raise ValueError(
                f"cache_samples needs num_workers=0 (got {num_workers}): DataLoader workers are re-created "
                "each epoch, so a cache filled in them would be lost"
            )
        self.cache_samples = cache_samples
        self.accumulate_grad_batches = accumulate_grad_batches
        if not 0 <= max_lost_fraction <= 1:
            raise ValueError(f"max_lost_fraction must be in [0, 1], got {max_lost_fraction}")
        self.max_lost_fraction = max_lost_fraction
        self._world_size = world_size
        self._rank = rank
        self._epochs_started = -1
        self._counter = SkipCounter()
        self.train_sources: list[Source] = []
        self.val_sources: list[Source] = []
        self.num_train_samples = 0
        """Training samples per epoch over all ranks (after mixing weights); set by `setup("fit")`."""
        self.train_batches_per_epoch = 0
        """Batches per epoch on each rank (the same on every rank); set by `setup("fit")`."""
        self.damaged_shards: list[DamagedShard] = []
        """Shards found missing or damaged by `setup()` (within `max_lost_fraction`, or setup raises)."""

    def attach_model_inputs(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        num_image_tokens: int,
        tile_layout: TileLayout | None = None,
    ) -> None:
        """Set the tokenizer, image processor, image-token count and AnyRes tiling of the model the data feeds."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.tile_layout = tile_layout

    def _require_model_inputs(self) -> None:
        if self.tokenizer is None or self.image_processor is None or self.num_image_tokens is None:
            raise RuntimeError(
                "LlavaDataModule has no tokenizer / image_processor / num_image_tokens: pass them to the "
                "constructor or call attach_model_inputs() before setup()"
            )

    @property
    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far per reason, over all workers of this rank (for logging)."""
        return self._counter.as_dict()

    def ranks(self) -> tuple[int, int]:
        """(number of ranks, this rank): explicit arguments, else the attached trainer, else torch.distributed/env."""
        if self._world_size is not None:
            return self._world_size, self._rank or 0
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        return _distributed_ranks()

    def setup(self, stage: str | None = None) -> None:
        """Read the manifests, check the shards against them, hold out validation shards, and size the epoch.

        Raises `DataLossError` when the shards found damaged would lose more than `max_lost_fraction` of a
        rank's epoch (training or validation); the same decision on every rank, before the first batch.
        """
        self._require_model_inputs()
        self.train_sources, self.val_sources = [], []
        damaged: dict[str, DamagedShard] = {}
        for spec in self.source_specs:
            source = _load_source(spec, damaged, self._image_geometry())
            held = self.val_shards_per_source
            if held:
                if held >= len(source.shards):
                    raise ValueError(
                        f"{spec['path']}: cannot hold out {held} of {len(source.shards)} shards for validation"
                    )
                self.val_sources.append(Source(source.name, 1.0, source.shards[-held:]))
                source = Source(source.name, source.weight, source.shards[:-held])
            self.train_sources.append(source)
        self.val_sources += [
            _load_source({**spec, "weight": 1.0}, damaged, self._image_geometry()) for spec in self.val_specs
        ]
        train = self._stream(self.train_sources, shuffle=True)
        self.num_train_samples = train.epoch_samples
        self.train_batches_per_epoch = len(train)
        world_size, _ = self.ranks()
        if train.rank_samples == 0:
            raise ValueError(f"{self.num_train_samples} training samples cannot feed {world_size} ranks")
        self.damaged_shards = list(damaged.values())
        if damaged:
            self._check_damage(train, damaged, "training")
            if self.val_sources:
                self._check_damage(self._stream(self.val_sources, shuffle=False), damaged, "validation")

    def _check_damage(self, stream: ShardStream, damaged: Mapping[str, DamagedShard], split: str) -> None:
        """Stop (`DataLossError`) when the damaged shards of `stream` could lose more than its bound in an
        epoch on one rank, else log them. A shard counts as often as an epoch may read it (its source's
        weight, rounded up)."""
        hits = [
            (damaged[path], math.ceil(source.weight))
            for source in stream.sources
            for path, _ in source.shards
            if path in damaged and source.weight > 0
        ]
        if not hits:
            return
        lost = sum(d.missing * reads for d, reads in hits)
        listing = "; ".join(
            f"{d.path}: {d.readable} of {d.expected} samples readable ({d.reason}: {d.detail})"
            for d, _ in hits
        )
        if lost > stream.max_lost:
            raise DataLossError(
                f"{split} data: damaged shards would lose up to {lost} samples of an epoch, more than "
                f"max_lost_fraction={stream.max_lost_fraction} of a rank's {stream.rank_samples} samples "
                f"allows ({stream.max_lost}): {listing}. Convert the source again (or copy the shards again), "
                "or raise data.max_lost_fraction to train without these samples"
            )
        log.warning(
            "%s data: damaged shards lose up to %d samples an epoch (within max_lost_fraction=%s); they are "
            "counted as shard_short/shard_unreadable and replaced by repeats: %s",
            split,
            lost,
            stream.max_lost_fraction,
            listing,
        )

    def _image_geometry(self) -> tuple[int, int, str]:
        """(height, width, aspect) the images are preprocessed to: what pre-resized shards must hold."""
        height, width = processor_output_size(self.image_processor)
        return height, width, self.image_aspect

    def _stream(self, sources: Sequence[Source], *, shuffle: bool) -> ShardStream:
        world_size, rank = self.ranks()
        encoder = SampleEncoder(
            tokenizer=self.tokenizer,
            image_loader=ImageLoader(
                self.image_processor,
                aspect=self.image_aspect,
                max_pixels=self.max_pixels,
                resize=self.image_resize,  # type: ignore[arg-type]
                tile_layout=self.tile_layout,
            ),
            template=get_template(self.template, system=self.system_prompt),
            num_image_tokens=self.num_image_tokens,
            max_length=self.max_length,
        )
        stream = ShardStream(
            sources,
            encoder=CachingEncoder(encoder) if self.cache_samples else encoder,
            pad_token_id=self.tokenizer.pad_token_id,
            batch_size=self.micro_batch_size,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle=shuffle,
            shuffle_buffer=self.shuffle_buffer,
            counter=self._counter,
            length_group=self._length_group() if shuffle else 1,  # validation: stream order, comparable loss
            mix_group_batches=shuffle and self._grouped() and self.length_group_steps > 1,
            max_lost_fraction=self.max_lost_fraction,
            pack_length=self.max_length if shuffle and self.packing else None,
        )
        stream.num_workers = self.num_workers
        return stream

    def _length_group(self) -> int:
        """Batches per length-sorted group in one worker: that worker's share of `length_group_steps` steps.

        The DataLoader hands out worker batches in turn, so with accumulation A and W workers each step holds
        A / W consecutive batches of every worker.
        """
        if not self._grouped():
            return 1
        return max(1, self.accumulate_grad_batches // max(1, self.num_workers)) * self.length_group_steps

    def _grouped(self) -> bool:
        """Whether training batches are built from groups of several batches' samples (sorted or packed)."""
        return self.group_by_length or self.packing

    def _next_epoch(self) -> int:
        if self.trainer is not None:
            return self.trainer.current_epoch
        self._epochs_started += 1
        return self._epochs_started

    def _resume_batches(self) -> int:
        """Batches of the current epoch consumed before the checkpoint this fit resumed from (else 0)."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        # `processed` counts batches whose training step finished before the checkpoint was written.
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _loader(self, stream: ShardStream, epoch_fn: Callable[[], int]) -> DataLoader:
        loader = _EpochDataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,  # workers are re-created each epoch and receive that epoch's plan
            worker_init_fn=_WorkerInit(rank=self.ranks()[1]),
        )
        loader.epoch_fn = epoch_fn
        return loader

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; each `iter()` is one epoch of the plan."""
        if not self.train_sources:
            self.setup("fit")
        loader = self._loader(self._stream(self.train_sources, shuffle=True), self._next_epoch)
        loader.resume_fn = self._resume_batches
        loader.step_batches = max(1, self.accumulate_grad_batches)
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order (an empty list when no validation data is configured)."""
        if not self.train_sources:
            self.setup("fit")
        if not self.val_sources:
            return []
        stream = self._stream(self.val_sources, shuffle=False)
        if stream.rank_samples == 0:
            raise ValueError(f"{stream.epoch_samples} validation samples cannot feed {self.ranks()[0]} ranks")
        return self._loader(stream, lambda: 0)


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive lists of `size` items; the last may be shorter."""
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _as_specs(sources: Sequence[Mapping[str, Any]] | str | None) -> list[dict[str, Any]]:
    """Normalise the `sources` setting (a folder, or a list of folders / `{"path", "weight"}` mappings)."""
    if sources is None:
        return []
    if isinstance(sources, (str, Path)):
        sources = [sources]  # type: ignore[list-item]
    specs = []
    for spec in sources:
        item = {"path": str(spec)} if isinstance(spec, (str, Path)) else dict(spec)
        if "path" not in item:
            raise ValueError(f"a data source needs a 'path': {item}")
        item.setdefault("weight", 1.0)
        if float(item["weight"]) < 0:
            raise ValueError(f"negative mixing weight for {item['path']}")
        specs.append(item)
    return specs


def _load_source(
    spec: Mapping[str, Any],
    damaged: dict[str, DamagedShard],
    geometry: tuple[int, int, str] | None = None,
) -> Source:
    """The source of one shard folder, its damaged shards (see `find_damaged_shards`) added to `damaged`.

    `geometry` is the (height, width, aspect) the images are preprocessed to; shards stored pre-resized for
    another one are refused with `ValueError`.
    """
    folder = Path(spec["path"])
    manifest = read_manifest(folder)
    stored = manifest.pre_resized
    if stored is not None and geometry is not None:
        wanted = {"height": geometry[0], "width": geometry[1], "aspect": geometry[2]}
        if {k: stored.get(k) for k in wanted} != wanted:
            raise ValueError(
                f"{folder}: images are stored pre-resized to {stored.get('height')}x{stored.get('width')} in "
                f"{stored.get('aspect')!r} aspect mode, but this run preprocesses to {geometry[0]}x{geometry[1]} "
                f"in {geometry[2]!r} mode; re-convert the source (without pre_resize, or with this size and "
                "aspect)"
            )
    for shard in find_damaged_shards(folder, manifest):
        damaged.setdefault(shard.path, shard)
    shards = tuple((str(folder / s.name), s.num_samples) for s in manifest.shards if s.num_samples > 0)
    return Source(name=spec.get("name") or manifest.source, weight=float(spec["weight"]), shards=shards)
