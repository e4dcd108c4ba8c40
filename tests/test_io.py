"""Atomic writes: a crash inside a write leaves the old file or folder and no temporaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.io import (
    atomic_file,
    atomic_folder,
    replace_folder_atomic,
    write_bytes_atomic,
    write_text_atomic,
)


class Crash(Exception):
    """Stands in for a process dying half-way through a write."""


def test_write_text_replaces_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    # Execute
    write_text_atomic(path, "old")
    write_text_atomic(path, "new ü")
    # Assert
    assert path.read_text(encoding="utf-8") == "new ü"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_write_bytes(tmp_path: Path) -> None:
    path = write_bytes_atomic(tmp_path / "x.bin", b"\x00\x01", fsync=False)
    assert path.read_bytes() == b"\x00\x01"


def test_crash_inside_a_file_write_keeps_the_old_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "stack.safetensors"
    path.write_bytes(b"old")
    # Execute: half the new file is written when the writer dies
    with pytest.raises(Crash), atomic_file(path) as tmp:
        tmp.write_bytes(b"half of the n")
        raise Crash
    # Assert
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["stack.safetensors"]


def test_crash_before_a_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Crash), atomic_file(tmp_path / "new.txt") as tmp:
        tmp.write_text("partial")
        raise Crash
    assert list(tmp_path.iterdir()) == []


def test_folder_replaces_the_old_one_whole(tmp_path: Path) -> None:
    # Prepare: an old folder with a file the new one lacks
    target = tmp_path / "final"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "stale").write_text("x")
    # Execute
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("2")
    # Assert
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "2"}
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_crash_inside_a_folder_write_keeps_the_old_folder(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "rounds" / "0001"
    with atomic_folder(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"old")
    # Execute
    with pytest.raises(Crash), atomic_folder(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"ne")
        raise Crash
    # Assert
    assert (target / "adapter_model.safetensors").read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["0001"]


def test_folder_without_replace_keeps_what_another_process_built(tmp_path: Path) -> None:
    # Prepare: the other process finished first
    target = tmp_path / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "config.json").write_text("theirs")
    # Execute
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "config.json").write_text("ours")
    # Assert
    assert (target / "config.json").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]


def test_replace_folder_into_a_new_place(tmp_path: Path) -> None:
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "index.html").write_text("page")
    assert replace_folder_atomic(staging, tmp_path / "report") == tmp_path / "report"
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_new_files_get_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic = write_text_atomic(tmp_path / "atomic", "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
