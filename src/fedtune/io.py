"""Atomic files and folders: a crash leaves the old version or the new one, never half of one.

Everything is written beside its target (same folder, hence same filesystem, so the final
``rename`` is atomic) under a hidden temporary name, flushed to disk, and only then renamed
into place; on any exception the temporary is removed and the target is untouched.

- :func:`atomic_file` yields a temporary path for a writer that wants a path (``safetensors``,
  ``savefig``, ``open``); :func:`write_text_atomic` / :func:`write_bytes_atomic` for contents.
- :func:`atomic_folder` yields a temporary folder (a peft adapter folder, a report, a model
  cache) that :func:`replace_folder_atomic` then swaps in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_file",
    "atomic_folder",
    "replace_folder_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path``; on a clean exit it is renamed over ``path``.

    The writer must create the temporary file; the parent folder is created.

    Parameters
    ----------
    path
        The file to (re)place.
    fsync
        Flush the new file to disk before the rename, so that after a power loss the name
        points at complete contents (the rename alone only protects against a process crash).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name, not a file made by mkstemp: the writer creates it, so it gets the usual
    # permissions (mkstemp's are 0600)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`); returns ``path``."""
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`); returns ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def replace_folder_atomic(staging: Path, target: Path) -> Path:
    """Rename the finished folder ``staging`` to ``target``, swapping out any old ``target``.

    ``rename`` cannot replace a non-empty folder, so an old ``target`` is first renamed aside
    and removed afterwards; only between those two renames is there no ``target`` (a reader
    then finds none rather than half of one). ``staging`` must be on ``target``'s filesystem.
    """
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()  # only its unique name is wanted
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, replace: bool = True, fsync: bool = True) -> Iterator[Path]:
    """A temporary folder beside ``target``; on a clean exit it becomes ``target``.

    Parameters
    ----------
    target
        The folder to (re)place; its parent is created.
    replace
        Replace an existing ``target`` (:func:`replace_folder_atomic`). False keeps the existing
        one and discards the new folder: for caches where another process may have built the
        same folder first.
    fsync
        Flush every file of the new folder to disk before the rename.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        if fsync:
            for file in staging.rglob("*"):
                if file.is_file() and not file.is_symlink():
                    _fsync(file)
        if replace:
            replace_folder_atomic(staging, target)
        else:
            try:
                staging.rename(target)
            except OSError:  # the target exists (another process won the race): keep it
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
