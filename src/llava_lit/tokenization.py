"""Tokenizer loading and the one place where conversations become input ids and label masks.

The ids are the official LLaVA preprocessing's, token for token (`tests/data/test_official_conformance.py`
checks them against ids produced by the official code): the template renders the whole conversation once, and
the text between image markers is tokenized piece by piece, as the official `tokenizer_image_token` does, so
each piece starts as a text of its own would (with SentencePiece's leading `▁` in non-legacy tokenizers), with
one BOS at the front and the image marker's id between pieces.

The mask is built from the text itself: every piece is tokenized once with character offsets, and a token is a
label exactly when it starts inside an answer span, which runs from the end of the assistant's role header (the
space after `ASSISTANT:` included, so the lone `▁` SentencePiece puts before an answer starting with a digit is
learned, as the official masks learn it) to the end of the answer's end-of-turn string. There is no per-round
re-tokenization whose lengths could drift from the real ids (the cause of LLaVA's silent "tokenization
mismatch"). When a span does not fall on token boundaries, or nothing is left to learn, the sample raises
`SkipSample`; it is never trained at zero loss.

The tokenizer's `legacy` mode (how SentencePiece treats the text after a special token such as `</s>`) changes
the ids, so it is decided once: a setting (`model.tokenizer_legacy`), else the tokenizer folder's own
`tokenizer_config.json`, else `legacy=True`, which is what transformers 4.37 (the official LLaVA stack) uses for
a folder that does not say (transformers 5 would silently use `legacy=False` there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from llava_lit.constants import DEFAULT_PAD_TOKEN, IGNORE_INDEX, IMAGE_TOKEN
from llava_lit.conversation import ChatTemplate, ConversationError, get_template

SKIP_REASONS = (
    "bad_roles",
    "image_in_answer",
    "image_count_mismatch",
    "target_misaligned",
    "empty_target",
    "truncation_cuts_image",
    "no_target_after_truncation",
)
"""Every reason `encode_conversation` can skip a sample for (stable keys for counters and logs)."""


class SkipSample(Exception):
    """A sample that cannot be trained on correctly; `reason` is one of `SKIP_REASONS` (or an image reason)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class EncodedSample:
    """Token ids and unshifted labels of one sample, image runs already expanded."""

    input_ids: torch.Tensor
    """LongTensor[L]."""
    labels: torch.Tensor
    """LongTensor[L]: `input_ids[i]` where trained, `IGNORE_INDEX` elsewhere."""


DEFAULT_LEGACY = True
"""`legacy` for a SentencePiece tokenizer whose folder does not record it: transformers 4.37's default, the
version the official LLaVA code trains and evaluates with."""


def recorded_legacy(name_or_path: str) -> bool | None:
    """The `legacy` value a tokenizer folder (or hub repository) records in its `tokenizer_config.json`."""
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    try:
        config = get_tokenizer_config(name_or_path)
    except (OSError, ValueError):
        return None
    value = config.get("legacy") if isinstance(config, dict) else None
    return value if isinstance(value, bool) else None


def load_tokenizer(
    name_or_path: str, *, legacy: bool | None = None, model_max_length: int | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer (hub id or folder), add `<image>` and a pad token if missing, pad on the right.

    Args:
        name_or_path: the tokenizer's folder or hub id. A folder holding only a SentencePiece `tokenizer.model`
            loads as a LLaMA tokenizer that adds BOS.
        legacy: the SentencePiece `legacy` mode; None = the folder's `tokenizer_config.json`, else
            `DEFAULT_LEGACY`. Ignored by tokenizers without the setting (byte-level BPE, ...);
            `tokenizer_legacy(tokenizer)` tells the mode a tokenizer was loaded in.
        model_max_length: recorded on the tokenizer.

    The tokenizer must be a fast one: masks are built from its character offsets.
    """
    folder = Path(name_or_path)
    only_sentencepiece = (
        folder.is_dir()
        and (folder / "tokenizer.model").exists()
        and not (folder / "tokenizer.json").exists()
        and not (folder / "tokenizer_config.json").exists()
    )
    if legacy is None:
        legacy = None if only_sentencepiece else recorded_legacy(name_or_path)
        legacy = DEFAULT_LEGACY if legacy is None else legacy
    if only_sentencepiece:
        # transformers 5: `LlamaTokenizer(vocab_file=...)` ignores the file; from_pretrained converts it.
        tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=legacy, add_bos_token=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if tokenizer_legacy(tokenizer) not in (None, legacy):
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, legacy=legacy)
    if tokenizer_legacy(tokenizer) not in (None, legacy):
        raise ValueError(f"{name_or_path}: the tokenizer did not load with legacy={legacy}")
    if not tokenizer.is_fast:
        raise ValueError(f"{name_or_path}: a fast (tokenizers-backed) tokenizer is needed for offset masks")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
    tokenizer.padding_side = "right"
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def tokenizer_legacy(tokenizer: PreTrainedTokenizerBase) -> bool | None:
    """The SentencePiece `legacy` mode `tokenizer` runs in; None for tokenizers without one."""
    value = getattr(tokenizer, "legacy", None)
    return value if isinstance(value, bool) else None


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of `<image>` in `tokenizer` (added by `load_tokenizer`)."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; load it with load_tokenizer")
    return token_id


def check_image_markers(turns: Sequence[Mapping[str, str]]) -> None:
    """Raise `SkipSample("image_in_answer")` when an answer holds an image marker (it could not be learned)."""
    for turn in turns:
        if turn.get("from", turn.get("role")) in ("gpt", "assistant"):
            if IMAGE_TOKEN in turn.get("value", turn.get("content", "")):
                raise SkipSample("image_in_answer")


def encode_conversation(
    conversations: Sequence[Mapping[str, str]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | str,
    num_image_tokens: int | Sequence[int],
    max_length: int,
    num_images: int,
) -> EncodedSample:
    """Render, tokenize once, mask by character spans, expand image markers, truncate. Raises `SkipSample`.

    `num_image_tokens`: the placeholder run of every image, or one count per image in order (AnyRes, where an
    image's count follows from its size).
    """
    if isinstance(template, str):
        template = get_template(template)
    check_image_markers(conversations)
    try:
        rendered = template.render(conversations)
    except ConversationError as err:
        raise SkipSample("bad_roles", str(err)) from err
    if not rendered.target_spans:
        raise SkipSample("bad_roles", "no assistant answer")

    text = rendered.text
    ids, offsets = tokenize_with_images(text, tokenizer)
    is_label = _label_mask(text, offsets, rendered.target_spans)

    img_id = image_token_id(tokenizer)
    found = ids.count(img_id)
    if found != num_images:
        raise SkipSample("image_count_mismatch", f"{found} <image> tokens for {num_images} images")

    # Expand each image id into its run (never a label); remember where the runs end so truncation keeps them
    # whole.
    token_ids = torch.tensor(ids, dtype=torch.long)  # [T]
    is_image = token_ids == img_id  # [T]
    labels = torch.where(
        torch.from_numpy(np.asarray(is_label, dtype=bool)) & ~is_image, token_ids, IGNORE_INDEX
    )  # [T]
    input_ids = token_ids
    run_ends = torch.zeros(0, dtype=torch.long)
    if found:
        if isinstance(num_image_tokens, int):
            counts = torch.full((found,), num_image_tokens, dtype=torch.long)  # [n_images]
        else:
            counts = torch.tensor(list(num_image_tokens), dtype=torch.long)  # [n_images]
            if len(counts) != found:
                raise ValueError(f"{len(counts)} image token counts for {found} images")
        repeats = torch.ones_like(token_ids)  # [T]
        repeats[is_image] = counts
        input_ids, labels = input_ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)  # [L]
        run_ends = repeats.cumsum(0)[is_image]  # [n_images]

    if len(input_ids) > max_length:
        if bool((run_ends > max_length).any()):
            raise SkipSample("truncation_cuts_image", f"{len(input_ids)} tokens > max_length {max_length}")
        input_ids, labels = input_ids[:max_length].clone(), labels[:max_length].clone()
        if bool((labels == IGNORE_INDEX).all()):
            raise SkipSample("no_target_after_truncation", f"{len(ids)} tokens > max_length {max_length}")
    return EncodedSample(input_ids=input_ids, labels=labels)


def tokenize_with_images(
    text: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, tokenized as the official `tokenizer_image_token` does.

    The text between `<image>` markers is tokenized piece by piece, each as a text of its own (BOS added, and
    SentencePiece's leading `▁` for non-legacy tokenizers); the first piece keeps its BOS, the later ones drop
    it, and each marker becomes the `<image>` token's id. Offsets index into `text`.
    """
    img_id = image_token_id(tokenizer)
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    position = 0
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(img_id)
            offsets.append((position - len(IMAGE_TOKEN), position))
        encoding = tokenizer(piece, add_special_tokens=True, return_offsets_mapping=True)
        piece_ids: list[int] = encoding["input_ids"]
        piece_offsets: list[tuple[int, int]] = encoding["offset_mapping"]
        drop = 1 if k and piece_ids[:1] == [bos] and bos is not None else 0
        ids.extend(piece_ids[drop:])
        offsets.extend((s + position, e + position) for s, e in piece_offsets[drop:])
        position += len(piece) + len(IMAGE_TOKEN)
    return ids, offsets


def _label_mask(
    text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """Mark the tokens that start inside a target span; raise if a span does not fall on token boundaries.

    A span starts where the assistant's header ends (its trailing space included). A token starting before a
    span may reach into it only over whitespace, and a label token may reach past the span's end only over
    whitespace; every non-space character of a span must be covered by the span's tokens. Zero-width tokens
    (a piece's BOS) are never labels.
    """
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [T, 2] character (start, end) per token
    starts, ends = bounds[:, 0], bounds[:, 1]
    is_label = np.zeros(len(bounds), dtype=bool)
    for start, end in spans:
        touching = (ends > start) & (starts < end) & (starts != ends)  # [T] tokens overlapping the span
        # A token may reach over the span's start or end only across whitespace.
        for k in np.flatnonzero(touching & ((starts < start) | (ends > end))).tolist():
            s, e = int(starts[k]), int(ends[k])
            if (s < start and text[start:e].strip()) or text[end:e].strip():
                raise SkipSample(
                    "target_misaligned", f"token {text[s:e]!r} crosses span {text[start:end]!r:.60}"
                )
        inside = touching & (
            starts >= start
        )  # a token ending in the span's leading whitespace is the header's
        if not inside.any():
            raise SkipSample("empty_target", f"no token in span {text[start:end]!r:.60}")
        is_label |= inside
        # Characters of the span that no label token covers: +1 where a token's cover opens, -1 where it closes.
        lo = np.maximum(starts[inside], start) - start
        hi = np.minimum(ends[inside], end) - start
        depth = np.cumsum(
            np.bincount(lo, minlength=end - start + 1) - np.bincount(hi, minlength=end - start + 1)
        )
        gaps = np.flatnonzero(depth[: end - start] == 0)  # span offsets no token covers
        missing = [text[start + i] for i in gaps.tolist() if not text[start + i].isspace()]
        if missing:
            raise SkipSample(
                "target_misaligned", f"characters {''.join(missing)!r:.40} of an answer have no token"
            )
    return is_label.tolist()
