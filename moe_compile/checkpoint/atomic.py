"""Atomic directory writes: a checkpoint directory either exists complete or not at all.

Files are written into a temporary directory beside the target (same filesystem, so `os.rename` is atomic), each
file and the directory fsynced, then renamed into place. `force=True` replaces an existing target the same way:
the old directory is renamed aside, the new one renamed in, then the old one deleted. A writer killed midway leaves
at most a temporary directory beside the target, which the next export into that parent removes once its
writer process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from moe_compile.errors import CheckpointError

log = logging.getLogger("moe_compile")

TMP_TAG = ".moe_compile-tmp-"  # .{target}.moe_compile-tmp-{pid}-{rand}: being written
OLD_TAG = ".moe_compile-old-"  # .{target}.moe_compile-old-{pid}-{rand}: a replaced target, being deleted
_SIDE_RE = re.compile(r"^\.(?P<target>.+)\.moe_compile-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")

# Called with each file's path right after it is written and fsynced (tests use it to kill a writer midway).
after_file_written: Callable[[Path], None] | None = None


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows): nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_written(path: Path) -> None:
    """Make `path` durable and give the test hook its chance to run."""
    fsync_file(path)
    if after_file_written is not None:
        after_file_written(path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove temporary directories beside `target` left by dead writers; return what was removed.

    A renamed-aside old target is only removed when the target exists again (otherwise it is the only copy: it is
    left in place and a warning names it).
    """
    removed = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _SIDE_RE.match(entry.name)
        if not match or match["target"] != target.name or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not target.exists():
            log.warning("moe_compile: %s holds the previous checkpoint of %s, whose replacement was interrupted; "
                        "rename it back to recover it", entry, target)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _side_path(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes `target` atomically, on failure it is removed."""
    target = Path(target).absolute()
    if target.exists() and not force:
        raise CheckpointError(f"{target} exists; pass force=True to replace it")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = _side_path(target, TMP_TAG)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        if target.exists():
            if not force:  # created by someone else meanwhile
                raise CheckpointError(f"{target} appeared while exporting; pass force=True to replace it")
            old = _side_path(target, OLD_TAG)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
