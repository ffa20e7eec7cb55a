"""One output directory belongs to one run.

Round 1 let two `compress` runs into one `--out` both exit 0 with their artifacts mixed, and a new
run into an old run's directory left the old `model.onnx`, `model.int8.onnx` and pass folders
beside the new report. A run therefore:
- holds an exclusive lock (`flock` on `OUT/.vitcompress.lock`, released by the kernel when the
  process dies, so a killed run never leaves a stale lock); a second run is refused naming the holder;
- records the hash of its resolved recipe in `OUT/run.json`: a later run of the same recipe resumes
  there (passes with checkpoints pick up where they stopped), any other run is refused unless it
  asks to overwrite, which empties the directory first;
- removes what killed runs left half-written: temp files and folders that only exist between a
  write and its rename.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from vitcompress.errors import OutputDirError
from vitcompress.fileio import write_json

log = logging.getLogger(__name__)

LOCK_NAME = ".vitcompress.lock"
RUN_FILE = "run.json"
# Left by a kill between a write and its rename (fileio's atomic writers, quantize's scratch).
STALE_PATTERNS = (".tmp-*", ".*.tmp", ".quantize-auto-*")


def recipe_fingerprint(resolved_recipe: str) -> str:
    return hashlib.sha256(resolved_recipe.encode()).hexdigest()


def prepare_out_dir(out_dir: Path) -> Path:
    """Create `out_dir`, or say in one line why it cannot be an output directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(
            f"--out {out_dir} is an existing file, not a directory", hint="choose a directory path for --out"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise OutputDirError(
            f"cannot write to output directory {out_dir}: {err.strerror or err}",
            hint="choose another --out, or fix its permissions",
        ) from err
    return out_dir


def clean_stale(directory: Path) -> list[str]:
    """Remove the temp files and folders that killed runs left anywhere under `directory` (call
    under the lock: then no live writer owns any of them)."""
    removed = []
    for pattern in STALE_PATTERNS:
        for item in sorted(directory.rglob(pattern), reverse=True):  # deepest first
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(str(item.relative_to(directory)))
    if removed:
        log.info("removed what an interrupted run left in %s: %s", directory, ", ".join(sorted(removed)))
    return removed


def clean_dead_scratch(directory: Path, target_name: str) -> None:
    """Outside a claimed run directory (`quantize --out FILE`): remove only what provably belongs to
    no live process: the staging files of `target_name` and auto-mode scratch whose pid is gone."""
    for item in directory.glob(f".{target_name}.*.tmp"):
        item.unlink(missing_ok=True)
    for item in directory.glob(".quantize-auto-*"):
        pid = item.name.removeprefix(".quantize-auto-").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(item, ignore_errors=True)
            log.info("removed %s, left by a killed run", item)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 4096, 0).decode().strip()
        if text:
            return text
    return "another process"


@contextlib.contextmanager
def claim_run_dir(out_dir: Path, fingerprint: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Hold `out_dir` for one run of the recipe whose resolved text hashes to `fingerprint`."""
    out_dir = prepare_out_dir(out_dir)
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirError(
                f"{out_dir} is in use by another run ({_holder(fd)})",
                hint="wait for it to finish, or choose another --out",
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        clean_stale(out_dir)
        _check_owner(out_dir, fingerprint, overwrite)
        write_json(out_dir / RUN_FILE, {"recipe_sha256": fingerprint, "started": started})
        try:
            yield out_dir
        finally:
            os.ftruncate(fd, 0)  # no holder named once this run is over
    finally:
        os.close(fd)  # releases the lock


def _check_owner(out_dir: Path, fingerprint: str, overwrite: bool) -> None:
    leftovers = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_NAME)
    if not leftovers:
        return
    previous = None
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((out_dir / RUN_FILE).read_text()).get("recipe_sha256")
    if previous == fingerprint and not overwrite:
        log.info("%s holds an earlier run of this recipe: resuming there", out_dir)
        return
    if not overwrite:
        shown = ", ".join(leftovers[:4]) + (f" and {len(leftovers) - 4} more" if len(leftovers) > 4 else "")
        what = "a run of another recipe" if previous else "files of no vitcompress run"
        raise OutputDirError(
            f"{out_dir} is not empty: it holds {what} ({shown})",
            hint="pass --overwrite to replace them, or choose an empty --out "
            "(rerunning the same recipe into it resumes)",
        )
    log.warning("--overwrite: removing %d item(s) from %s", len(leftovers), out_dir)
    for name in leftovers:
        item = out_dir / name
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
