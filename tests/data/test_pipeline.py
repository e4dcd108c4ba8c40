"""Config -> clients' partitions: a category read from any record field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.data.pipeline import partitions
from fedtune.errors import FedtuneError


def _write(path: Path, topics: list[str | None]) -> Path:
    rows = []
    for i, topic in enumerate(topics):
        row = {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        if topic is not None:
            row["topic"] = topic
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def _cfg(path: Path):  # type: ignore[no-untyped-def]
    return load_config(
        "configs/tiny.toml",
        [f"data.source='{path}'", "partition.column='topic'", "partition.num_partitions=2",
         "partition.min_partition_size=1"],
    )  # fmt: skip


def test_partition_column_names_the_record_field(tmp_path: Path) -> None:
    parts = partitions(_cfg(_write(tmp_path / "d.jsonl", ["a", "b", "a", "b", "a"])))
    assert sorted(len(p) for p in parts) == [2, 3]
    assert all(len(set(p["topic"])) == 1 for p in parts)  # one topic per client


def test_a_record_without_the_field_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", ["a", "b", None, "b"])
    with pytest.raises(FedtuneError, match=r"d\.jsonl:3: field 'topic' is missing or blank"):
        partitions(_cfg(path))
