"""Atomic writes: a directory written with atomic_tree is always the complete old or the complete new one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vitcompress.fileio import atomic_tree, recover_tree


def _write(path: Path, version: str, files: tuple[str, ...] = ("a.bin", "b.txt")) -> None:
    with atomic_tree(path) as tmp:
        for name in files:
            (tmp / name).write_text(f"{name} {version}")


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


class Killed(Exception):
    pass


def test_a_directory_is_replaced_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "ckpt"
    _write(target, "v1", ("a.bin", "b.txt", "stale.txt"))
    assert _contents(target) == {"a.bin": "a.bin v1", "b.txt": "b.txt v1", "stale.txt": "stale.txt v1"}
    _write(target, "v2")
    assert _contents(target) == {"a.bin": "a.bin v2", "b.txt": "b.txt v2"}  # the old directory is gone
    assert _siblings(target) == ["ckpt"]


def test_a_failed_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    _write(target, "v1")
    with pytest.raises(Killed), atomic_tree(target) as tmp:
        (tmp / "a.bin").write_text("half")
        raise Killed
    assert _contents(target) == {"a.bin": "a.bin v1", "b.txt": "b.txt v1"}
    assert _siblings(target) == ["ckpt"]


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_a_kill_at_any_rename_leaves_the_complete_old_or_new(tmp_path, monkeypatch, kill_at):
    """Renames: 1 old -> .old-*, 2 .tmp-* -> NAME, 3 .old-* -> trash. A kill before rename k leaves
    the old directory (k <= 2, once recovered) or the new one (k == 3)."""
    target = tmp_path / "ckpt"
    _write(target, "v1")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == kill_at:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        _write(target, "v2")
    monkeypatch.setattr(os, "rename", real)
    assert len(calls) == kill_at
    if kill_at == 2:  # between the renames: NAME is missing, the complete old one waits beside it
        assert not target.exists()
        assert [n for n in _siblings(target) if n.startswith(".old-ckpt-")]
    recover_tree(target)  # what every reader does first
    expected = "v2" if kill_at == 3 else "v1"
    assert _contents(target) == {"a.bin": f"a.bin {expected}", "b.txt": f"b.txt {expected}"}
    _write(target, "v3")  # the next write also clears what the killed one left
    assert _contents(target) == {"a.bin": "a.bin v3", "b.txt": "b.txt v3"}
    assert _siblings(target) == ["ckpt"]


def test_leftovers_of_a_hard_kill_are_recovered_or_cleared(tmp_path):
    """A SIGKILL runs no `finally`: the temp directory stays. Recovery restores a complete `.old-*`
    only when NAME is missing, and a writer deletes stale `.tmp-*`/`.old-*` of its own name only."""
    target = tmp_path / "ckpt"
    (tmp_path / ".old-ckpt-0123abcd").mkdir()
    (tmp_path / ".old-ckpt-0123abcd" / "a.bin").write_text("a.bin v1")
    (tmp_path / ".tmp-ckpt-89abcdef").mkdir()
    (tmp_path / ".tmp-ckpt-89abcdef" / "a.bin").write_text("half")
    (tmp_path / ".tmp-other-89abcdef").mkdir()  # another directory's: left alone
    recover_tree(target)
    assert _contents(target) == {"a.bin": "a.bin v1"}
    assert ".tmp-ckpt-89abcdef" in _siblings(target)  # a reader does not delete
    _write(target, "v2")
    assert _siblings(target) == [".tmp-other-89abcdef", "ckpt"]
    recover_tree(tmp_path / "missing")  # nothing to recover: no error, nothing made
    assert not (tmp_path / "missing").exists()


def test_whole_directory_writes_give_files_the_umask_mode(tmp_path):
    """safetensors creates its files 0o600; artifacts and checkpoints must read like any new file."""
    import stat

    from vitcompress.fileio import atomic_dir, atomic_tree

    old = os.umask(0o022)
    try:
        with atomic_tree(tmp_path / "tree") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)
        with atomic_dir(tmp_path / "flat") as tmp:
            (tmp / "model.onnx.data").write_bytes(b"x")
            os.chmod(tmp / "model.onnx.data", 0o600)
    finally:
        os.umask(old)
    for path in (tmp_path / "tree" / "model.safetensors", tmp_path / "flat" / "model.onnx.data"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
