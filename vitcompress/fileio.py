"""Atomic file writes: a kill at any point leaves either the old file or the new one, never half of one.

`atomic_path` writes one file; `atomic_dir` several files into an existing folder, each replaced on
its own; `atomic_tree` a whole directory as one unit (a training checkpoint, a model artifact).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_umask: int | None = None
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask. Linux says it in /proc/self/status without changing it; elsewhere it is read
    once, by setting it to 0 and putting it back at once, under a lock."""
    global _umask
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0)
            os.umask(_umask)
        return _umask


def file_mode() -> int:
    """The mode an ordinary new file gets (0o644 under umask 022): mkstemp makes 0o600 files."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`, with
    the mode a plain open() would have given it (the user's umask), not mkstemp's private 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), file_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success its files replace those in `path`.

    Used where a writer produces several files that refer to each other by name (an ONNX model and
    its external data, a safetensors file and its manifest).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path))
    try:
        yield tmp
        for item in sorted(tmp.iterdir()):
            with open(item, "rb+") as fh:
                os.fsync(fh.fileno())
                os.fchmod(fh.fileno(), file_mode())  # writers such as safetensors create 0o600 files
            os.replace(item, path / item.name)
        _fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{kind}-{path.name}-{secrets.token_hex(4)}"


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Siblings `.KIND-NAME-xxxxxxxx` that `atomic_tree` left beside `path`, newest first."""
    pattern = re.compile(rf"\.{kind}-{re.escape(path.name)}-[0-9a-f]{{8}}")
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def recover_tree(path: Path, clean: bool = False) -> None:
    """Bring `path` back to a complete state after an `atomic_tree` write was killed.

    A write renames the old directory to `.old-NAME-x`, the new one from `.tmp-NAME-y` to NAME, then
    deletes the old one. Killed between the two renames, NAME is missing and `.old-NAME-x` is the
    complete old directory: it is renamed back. With `clean`, leftovers of killed writes (`.tmp-*`
    and `.old-*` while NAME exists) are deleted too; only a writer should ask for that.
    """
    path = Path(path)
    if not path.exists():
        olds = _leftovers(path, "old")
        if olds:
            try:
                os.rename(olds[0], path)
            except OSError:
                if not path.exists():  # not another process (a torchrun rank) restoring it first
                    raise
            _fsync_dir(path.parent)
    if clean and path.exists():
        for stale in _leftovers(path, "old") + _leftovers(path, "tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk, with the user's umask mode (safetensors writes 0o600)."""
    for directory, _subdirs, files in os.walk(root):
        for name in files:
            with open(Path(directory) / name, "rb") as fh:
                os.fsync(fh.fileno())
                os.fchmod(fh.fileno(), file_mode())
        _fsync_dir(Path(directory))


@contextlib.contextmanager
def atomic_tree(path: Path) -> Iterator[Path]:
    """Yield an empty directory beside `path`; on success it replaces `path` as a whole.

    Whatever `path` held before is gone afterwards (use it where the directory is one unit). A kill
    at any point leaves, once `recover_tree` ran (every read and write of a checkpoint does), either
    the complete old directory or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_tree(path, clean=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _sibling(path, "old") if path.exists() else None
        if old is not None:
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            trash = _sibling(path, "tmp")  # a `.tmp-*` is garbage by definition, even half-deleted
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
