"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Everything the project writes that a later step reads back (checkpoints, the projector handoff, exports, shard
folders and their manifests) goes through these two context managers. Each writes beside its target, in the
same folder, so the final rename never crosses a filesystem (a rename across filesystems is a copy, and a copy
that fails on a full disk leaves a truncated target); the data is fsynced before the rename and the folder after
it, so a power loss cannot leave the new name pointing at unwritten blocks. When the writing fails (no space
left, an exception, a kill), the previous version is untouched and the temporary is removed (after a kill
it stays as a hidden `.<name>.tmp-<pid>` sibling, never under the target's name).

A folder cannot be swapped by one rename when the target exists, so `atomic_directory` renames the old folder
aside (`.<name>.old`), moves the new one in, then deletes the old one. A crash between those two renames
leaves only `.<name>.old`; `recover_interrupted_swap` puts it back, and readers of checkpoints call it first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _temp_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _old_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (new, renamed or removed names) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) do not fsync folders
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on a clean exit it replaces `path` atomically.

    `mode` is `wb` or `w` (then `encoding` defaults to UTF-8). On an exception the temporary is removed and
    `path` keeps its previous content (or stays absent).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(path, "tmp")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    try:
        with open(temp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root` (what a folder must have on disk before it is renamed in)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of `path`; on a clean exit it takes `path`'s place.

    Whatever was at `path` (a folder or a file) stays untouched until everything inside the new folder is on
    disk, and is removed only after the new folder holds the name. On an exception the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(path)
    temp = _temp_sibling(path, "tmp")
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        yield temp
        fsync_tree(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    replace_path(temp, path)


def replace_path(source: str | Path, target: str | Path) -> None:
    """Move `source` (a complete file or folder beside `target`) to `target`, replacing what was there.

    A file replaces a file in one atomic rename. Otherwise the old target is renamed aside first and removed
    after the new one holds the name (see the module docstring for the crash window and its recovery).
    """
    source, target = Path(source), Path(target)
    if source.is_file() and not target.is_dir():
        os.replace(source, target)
        fsync_dir(target.parent)
        return
    old = _old_sibling(target)
    if old.exists() or old.is_symlink():
        _remove(old)
    if target.exists() or target.is_symlink():
        os.rename(target, old)
    os.rename(source, target)
    fsync_dir(target.parent)
    if old.exists() or old.is_symlink():
        _remove(old)


def recover_interrupted_swap(path: str | Path) -> bool:
    """Put back `path`'s previous version when a swap was interrupted between its two renames.

    Returns True when something was restored. Safe to call at any time: it acts only when `path` is missing
    and its `.old` sibling exists.
    """
    path = Path(path)
    old = _old_sibling(path)
    if old.exists() and not (path.exists() or path.is_symlink()):
        os.rename(old, path)
        fsync_dir(path.parent)
        return True
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
