"""The teacher's prompt sets: one editable folder per data type, loaded into chat messages.

Layout of a folder (the official LLaVA layout, so existing prompt folders drop in): `system_message.txt`,
few-shot pairs `NNN_caps.txt` (what the teacher is shown) and `NNN_conv.txt` (what it should write), and for
detailed descriptions `instructions.txt`, the user instructions a description is paired with. The prompt
version is a hash of the folder's files, so editing a prompt invalidates exactly the cached replies it made.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPTS_DIR = Path(__file__).parent / "prompts"
DATA_TYPES = ("conversation", "detail_description", "complex_reasoning")


@dataclass(frozen=True)
class PromptSet:
    """System message, few-shot (shown, written) pairs and optional instruction list for one data type."""

    name: str
    system: str
    examples: tuple[tuple[str, str], ...]
    instructions: tuple[str, ...]
    version: str
    """First 12 hex digits of the sha256 over the folder's files."""

    def messages(self, context: str) -> list[dict[str, str]]:
        """Chat messages for one image: system, few-shot user/assistant pairs, then `context` as the user turn."""
        msgs = [{"role": "system", "content": self.system}]
        for shown, written in self.examples:
            msgs += [{"role": "user", "content": shown}, {"role": "assistant", "content": written}]
        msgs.append({"role": "user", "content": context})
        return msgs


def load_prompt_set(folder: str | Path, name: str | None = None) -> PromptSet:
    """Read one prompt folder; raises `FileNotFoundError` naming what is missing."""
    folder = Path(folder)
    system_file = folder / "system_message.txt"
    if not system_file.is_file():
        raise FileNotFoundError(f"prompt folder {folder} has no system_message.txt")
    shown_files = sorted(folder.glob("*_caps.txt"))
    examples = []
    for shown in shown_files:
        written = shown.with_name(shown.name.replace("_caps.txt", "_conv.txt"))
        if not written.is_file():
            raise FileNotFoundError(f"few-shot input {shown} has no matching {written.name}")
        examples.append(
            (shown.read_text(encoding="utf-8").strip(), written.read_text(encoding="utf-8").strip())
        )
    instructions_file = folder / "instructions.txt"
    instructions = ()
    if instructions_file.is_file():
        instructions = tuple(
            line.strip() for line in instructions_file.read_text(encoding="utf-8").splitlines()
        )
        instructions = tuple(i for i in instructions if i)
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".txt"):
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return PromptSet(
        name=name or folder.name,
        system=system_file.read_text(encoding="utf-8").strip(),
        examples=tuple(examples),
        instructions=instructions,
        version=digest.hexdigest()[:12],
    )


def load_prompt_sets(root: str | Path | None, types: list[str]) -> dict[str, PromptSet]:
    """Prompt sets for `types` from `root/<type>/` (the packaged prompts when `root` is None)."""
    root = Path(root) if root else DEFAULT_PROMPTS_DIR
    sets = {t: load_prompt_set(root / t, t) for t in types}
    if "detail_description" in sets and not sets["detail_description"].instructions:
        raise FileNotFoundError(
            f"{root / 'detail_description'} needs an instructions.txt (one instruction a line)"
        )
    return sets
