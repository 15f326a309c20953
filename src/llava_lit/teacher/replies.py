"""Strict parsing and filtering of teacher replies into question/answer turns.

A reply is either parsed completely or rejected with a reason; nothing half-parsed is ever written. Formats
(as in the paper's prompts): conversations are alternating `Question:` / `Answer:` blocks separated by lines
holding `===`; complex reasoning is exactly one such pair; a detailed description is a bare paragraph. Replies
are also dropped, as the paper's data implies, when they are empty, were cut off by the token limit, leak
box coordinates, or mention the captions/descriptions the teacher was given instead of "the image".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_BANNED_WORDS = ("caption", "description", "bounding box", "coordinate")
"""Words that show the teacher talking about its inputs rather than the image (matched as word prefixes)."""

_COORDINATES = re.compile(r"\[\s*-?\d*\.?\d+\s*,\s*-?\d*\.?\d+|\b0?\.\d{2,}\b")
"""A bracketed number pair, or a fraction written with 2+ decimals like the boxes the teacher was shown."""
_SEPARATOR = re.compile(r"^\s*===+\s*$", re.MULTILINE)


class RejectedReply(ValueError):
    """A teacher reply that cannot be used; `reason` is a short stable label for the summary counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _check_content(text: str, banned_words: Sequence[str]) -> None:
    if _COORDINATES.search(text):
        raise RejectedReply("mentions_coordinates", _COORDINATES.search(text).group(0))
    for word in banned_words:
        if re.search(rf"\b{re.escape(word)}", text, re.IGNORECASE):
            raise RejectedReply("mentions_inputs", word)


def parse_qa_blocks(text: str) -> list[tuple[str, str]]:
    """`Question:`/`Answer:` blocks separated by `===` lines into (question, answer) pairs, or `RejectedReply`."""
    blocks = [b.strip() for b in _SEPARATOR.split(text.strip())]
    if blocks and blocks[-1] == "":
        blocks.pop()  # the format closes the last block with === too
    if not blocks or any(b == "" for b in blocks):
        raise RejectedReply("bad_format", "empty block between separators")
    if len(blocks) % 2:
        raise RejectedReply("bad_format", f"{len(blocks)} blocks; questions and answers must pair up")
    pairs = []
    for i in range(0, len(blocks), 2):
        q, a = blocks[i], blocks[i + 1]
        if not q.startswith("Question:") or not a.startswith("Answer:"):
            raise RejectedReply(
                "bad_format", f"block {i} must open with 'Question:' and block {i + 1} with 'Answer:'"
            )
        q, a = q[len("Question:") :].strip(), a[len("Answer:") :].strip()
        if not q or not a:
            raise RejectedReply("empty", f"pair {i // 2} has an empty question or answer")
        if "Question:" in a or "Answer:" in q:
            raise RejectedReply(
                "bad_format", f"pair {i // 2} holds a second Question/Answer without separator"
            )
        pairs.append((q, a))
    return pairs


def parse_reply(
    data_type: str,
    text: str,
    finish_reason: str | None = None,
    banned_words: Sequence[str] = DEFAULT_BANNED_WORDS,
) -> list[tuple[str, str]]:
    """(question, answer) turns from one teacher reply, or `RejectedReply`.

    `conversation` gives one or more pairs and `complex_reasoning` exactly one. `detail_description` gives
    `[("", paragraph)]`: its question is picked by the pipeline from the prompt set's instruction list.
    """
    if finish_reason == "length":
        raise RejectedReply("truncated", "the reply hit max_tokens")
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise RejectedReply("empty")
    _check_content(text, banned_words)
    if data_type == "detail_description":
        if _SEPARATOR.search(text) or re.search(r"^\s*(Question|Answer):", text, re.MULTILINE):
            raise RejectedReply("bad_format", "a description must be prose, not Question/Answer blocks")
        return [("", text)]
    pairs = parse_qa_blocks(text)
    if data_type == "complex_reasoning" and len(pairs) != 1:
        raise RejectedReply("bad_format", f"complex reasoning needs exactly one pair, got {len(pairs)}")
    if data_type not in ("conversation", "complex_reasoning"):
        raise ValueError(f"unknown data type {data_type!r}")
    return pairs
