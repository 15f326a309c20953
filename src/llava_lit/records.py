"""Validation of LLaVA-format records, so malformed JSON entries are rejected with a reason instead of crashing later.

A LLaVA record (`blip_laion_cc_sbu_558k.json`, `llava_instruct_150k.json`, `llava_v1_5_mix665k.json`) is
`{"id": ..., "image": "relative/path.jpg" (optional), "conversations": [{"from": "human"|"gpt", "value": str}]}`.
Some derived datasets give several images as a list under `image`; both forms are accepted here.

Everything the converter writes from a record is checked here: the types of `id`, `image` and the turns, and
that every string among them is valid Unicode (JSON can spell a lone surrogate such as `"\ud800"`, which no
UTF-8 writer accepts). Where the image paths point is checked by the converter, which knows the image folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HUMAN_ROLES = frozenset({"human", "user"})
"""`from` values that mark a user turn (LLaVA writes `human`; some derived sets write `user`)."""

ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
"""`from` values that mark an assistant turn (LLaVA writes `gpt`)."""


class InvalidRecord(ValueError):
    """A record that does not follow the LLaVA format; `reason` is a short stable key for skip reports."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Record:
    """A validated LLaVA record."""

    id: str
    """The record's `id`, as a string (LLaVA ids are sometimes ints)."""
    images: tuple[str, ...]
    """Image paths relative to the image folder, in the order their `<image>` markers appear; empty for text."""
    conversations: tuple[dict[str, str], ...]
    """The turns, each `{"from": ..., "value": ...}`, exactly as in the source file."""


def _check_text(value: str, what: str) -> None:
    """Raise `InvalidRecord("invalid_unicode")` when `value` cannot be written as UTF-8 (a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRecord(
            "invalid_unicode", f"{what}: lone surrogate {value[err.start]!r} at character {err.start}"
        ) from None


def parse_record(raw: Any) -> Record:
    """Validate one JSON entry and return it as a `Record`; raise `InvalidRecord` with a reason otherwise.

    Reasons: `invalid_record` (not an object; `id` missing or not a string/integer; a bad `image` field; no
    turns; a turn without a string `value` or with an unknown role) and `invalid_unicode` (a lone surrogate in
    the id, an image path or a turn's value).
    """
    if not isinstance(raw, dict):
        raise InvalidRecord("invalid_record", f"expected an object, got {type(raw).__name__}")
    if "id" not in raw:
        raise InvalidRecord("invalid_record", "no 'id'")
    record_id = raw["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise InvalidRecord("invalid_record", f"'id' must be a string or an integer, got {record_id!r:.80}")
    if isinstance(record_id, str):
        _check_text(record_id, "id")
    image = raw.get("image")
    if image is None:
        images: tuple[str, ...] = ()
    elif isinstance(image, str) and image:
        images = (image,)
    elif isinstance(image, list) and image and all(isinstance(p, str) and p for p in image):
        images = tuple(image)
    else:
        raise InvalidRecord("invalid_record", f"bad 'image' field {image!r:.80}")
    for path in images:
        _check_text(path, "image path")
        if "\0" in path:
            raise InvalidRecord("invalid_record", f"NUL character in image path {path!r:.80}")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise InvalidRecord("invalid_record", "'conversations' must be a non-empty list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise InvalidRecord("invalid_record", f"bad turn {turn!r:.80}")
        role = turn.get("from")
        if not isinstance(role, str) or role not in HUMAN_ROLES | ASSISTANT_ROLES:
            raise InvalidRecord("invalid_record", f"unknown role {role!r:.80}")
        _check_text(turn["value"], f"turn {i} value")
    turns = tuple({"from": t["from"], "value": t["value"]} for t in conversations)
    return Record(id=str(record_id), images=images, conversations=turns)
