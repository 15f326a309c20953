"""Tokenizer loading and the one place where conversations become input ids and label masks.

The mask is built from the text itself: the template renders the whole conversation once, the tokenizer
tokenizes that text once with character offsets, and a token is a label exactly when its characters lie in an
answer span. There is no per-round re-tokenization whose lengths could drift from the real ids (the cause of
LLaVA's silent "tokenization mismatch"). When the spans do not fall on token boundaries, or nothing is left to
learn, the sample raises `SkipSample`; it is never trained at zero loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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


def load_tokenizer(name_or_path: str, *, model_max_length: int | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer (hub id or folder), add `<image>` and a pad token if missing, pad on the right.

    A folder holding only a SentencePiece `tokenizer.model` loads as a LLaMA tokenizer that adds BOS. The
    tokenizer must be a fast one: masks are built from its character offsets.
    """
    folder = Path(name_or_path)
    only_sentencepiece = (
        folder.is_dir()
        and (folder / "tokenizer.model").exists()
        and not (folder / "tokenizer.json").exists()
        and not (folder / "tokenizer_config.json").exists()
    )
    if only_sentencepiece:
        # transformers 5: `LlamaTokenizer(vocab_file=...)` ignores the file; from_pretrained converts it.
        tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=False, add_bos_token=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
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
    num_image_tokens: int,
    max_length: int,
    num_images: int,
) -> EncodedSample:
    """Render, tokenize once, mask by character spans, expand image markers, truncate. Raises `SkipSample`."""
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
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    offsets: list[tuple[int, int]] = encoding["offset_mapping"]
    is_label = _label_mask(text, offsets, rendered.target_spans)

    img_id = image_token_id(tokenizer)
    found = sum(1 for i in ids if i == img_id)
    if found != num_images:
        raise SkipSample("image_count_mismatch", f"{found} <image> tokens for {num_images} images")

    # Expand each image id into its run; remember the runs so truncation can keep them whole.
    input_ids: list[int] = []
    labels: list[int] = []
    run_ends: list[int] = []
    for token, label in zip(ids, is_label, strict=True):
        if token == img_id:
            input_ids.extend([img_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            run_ends.append(len(input_ids))
        else:
            input_ids.append(token)
            labels.append(token if label else IGNORE_INDEX)

    if len(input_ids) > max_length:
        if any(end > max_length for end in run_ends):
            raise SkipSample("truncation_cuts_image", f"{len(input_ids)} tokens > max_length {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample("no_target_after_truncation", f"{len(ids)} tokens > max_length {max_length}")
    return EncodedSample(
        input_ids=torch.tensor(input_ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long)
    )


def _label_mask(
    text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """Mark tokens whose characters lie in a target span; raise if a span does not fall on token boundaries.

    A token may reach outside its span only over whitespace (SentencePiece glues the space before an answer to
    its first token). Every non-space character of a span must be covered by the span's tokens.
    """
    is_label = [False] * len(offsets)
    for start, end in spans:
        covered = bytearray(end - start)
        count = 0
        for k, (s, e) in enumerate(offsets):
            if e <= start or s >= end or s == e:
                continue
            if text[s:start].strip() or text[end:e].strip():
                raise SkipSample(
                    "target_misaligned", f"token {text[s:e]!r} crosses span {text[start:end]!r:.60}"
                )
            is_label[k] = True
            count += 1
            covered[max(s, start) - start : min(e, end) - start] = b"\x01" * (min(e, end) - max(s, start))
        if count == 0:
            raise SkipSample("empty_target", f"no token in span {text[start:end]!r:.60}")
        missing = [
            c for c, flag in zip(text[start:end], covered, strict=True) if not flag and not c.isspace()
        ]
        if missing:
            raise SkipSample(
                "target_misaligned", f"characters {''.join(missing)!r:.40} of an answer have no token"
            )
    return is_label
