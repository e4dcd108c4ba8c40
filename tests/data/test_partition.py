"""Tests for fedtune.data.partition, with sizes worked out by hand."""

from __future__ import annotations

from typing import Any

import pytest
from datasets import Dataset
from rich.console import Console

from fedtune.data.partition import (
    PARTITIONERS,
    partition_counts,
    partition_dataset,
    partition_table,
    split_train_test,
)
from fedtune.errors import FedtuneError


def make_ds(categories: list[str]) -> Dataset:
    """A converted dataset whose message text is the row index, so rows can be traced."""
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "ok"}]
                for i in range(len(categories))
            ],
            "category": categories,
        }
    )


def row_ids(ds: Dataset) -> list[int]:
    return [int(m[0]["content"]) for m in ds["messages"]]


def test_registry_names() -> None:
    assert PARTITIONERS.names() == ["category", "dirichlet", "iid", "shards"]


# --- category -------------------------------------------------------------------------------


def test_category_keeps_largest_first() -> None:
    # Prepare: a x5, b x3, c x2, interleaved
    ds = make_ds(["c", "a", "b", "a", "c", "a", "b", "a", "b", "a"])

    # Execute
    parts = partition_dataset(ds, name="category", num_partitions=2)

    # Assert: c (the smallest) is dropped; a (5) is client 0, b (3) client 1
    assert [len(p) for p in parts] == [5, 3]
    assert set(parts[0]["category"]) == {"a"}
    assert set(parts[1]["category"]) == {"b"}
    assert row_ids(parts[0]) == [1, 3, 5, 7, 9]
    assert row_ids(parts[1]) == [2, 6, 8]


def test_category_order_beats_alphabetical_and_ties_by_name() -> None:
    # z x3 is the largest; x and y tie at 2 so x comes before y
    ds = make_ds(["y", "z", "x", "z", "y", "x", "z"])
    parts = partition_dataset(ds, name="category", num_partitions=3)
    assert [p["category"][0] for p in parts] == ["z", "x", "y"]
    assert [len(p) for p in parts] == [3, 2, 2]


def test_category_too_many_partitions() -> None:
    ds = make_ds(["a", "a", "b", "c"])
    with pytest.raises(FedtuneError, match=r"partition\.num_partitions=4"):
        partition_dataset(ds, name="category", num_partitions=4)


# --- iid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", "  ", None])
def test_category_refuses_a_record_without_one_naming_its_line(blank: str | None) -> None:
    # Prepare: rows 0 and 2 have a category, row 1 (line 2 of the file) and row 3 do not
    ds = make_ds(["a", "b", "a", "b"])
    ds = ds.map(lambda row, i: {"category": blank if i in (1, 3) else row["category"]}, with_indices=True)
    ds = ds.add_column("where", [f"d.jsonl:{i + 1}" for i in range(4)])

    with pytest.raises(
        FedtuneError,
        match=r"^d\.jsonl:2: field 'category' is missing or blank; partition\.name='category' assigns "
        r"clients by partition\.column='category', so every record needs one \(2 of 4 records lack it\)$",
    ):
        partition_dataset(ds, name="category", num_partitions=1)


@pytest.mark.parametrize("name", ["dirichlet", "shards"])
def test_other_column_schemes_refuse_blank_values_too(name: str) -> None:
    ds = make_ds(["a", "b", "", "a", "b", "a"])  # no where column: the row index is named

    with pytest.raises(
        FedtuneError, match=rf"^record 2: field 'category' is missing or blank; partition\.name='{name}'"
    ):
        partition_dataset(ds, name=name, num_partitions=2, min_partition_size=1, shards_per_client=1)


def test_iid_ignores_blank_categories() -> None:
    parts = partition_dataset(make_ds(["", "", "a", ""]), name="iid", num_partitions=2)

    assert [len(p) for p in parts] == [2, 2]


def test_iid_sizes_cover_all_rows() -> None:
    ds = make_ds(["a"] * 10)
    parts = partition_dataset(ds, name="iid", num_partitions=3, seed=1)
    # 10 = 4 + 3 + 3: the first 10 % 3 = 1 shard gets the extra row
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(i for p in parts for i in row_ids(p)) == list(range(10))


def test_iid_is_seeded() -> None:
    ds = make_ds(["a"] * 20)
    first = [row_ids(p) for p in partition_dataset(ds, name="iid", num_partitions=2, seed=3)]
    again = [row_ids(p) for p in partition_dataset(ds, name="iid", num_partitions=2, seed=3)]
    other = [row_ids(p) for p in partition_dataset(ds, name="iid", num_partitions=2, seed=4)]
    assert first == again
    assert first != other
    assert first[0] != list(range(10))  # shuffled, not contiguous


# --- dirichlet ------------------------------------------------------------------------------


def test_dirichlet_respects_min_size_and_keeps_all_rows() -> None:
    ds = make_ds(["a"] * 10 + ["b"] * 10)
    parts = partition_dataset(ds, name="dirichlet", num_partitions=3, alpha=0.5, min_partition_size=3, seed=0)
    assert len(parts) == 3
    assert all(len(p) >= 3 for p in parts)
    # without self-balancing every row goes to some client exactly once
    assert sorted(i for p in parts for i in row_ids(p)) == list(range(20))


def test_dirichlet_is_seeded() -> None:
    ds = make_ds(["a"] * 10 + ["b"] * 10 + ["c"] * 10)

    def run() -> list[list[int]]:
        parts = partition_dataset(ds, name="dirichlet", num_partitions=3, alpha=1.0, seed=7)
        return [row_ids(p) for p in parts]

    assert run() == run()


def test_dirichlet_impossible_min_size() -> None:
    # 4 rows cannot give 2 clients 3 rows each, whatever the draw
    ds = make_ds(["a", "a", "b", "b"])
    with pytest.raises(FedtuneError, match=r"partition\.min_partition_size=3"):
        partition_dataset(ds, name="dirichlet", num_partitions=2, min_partition_size=3)


# --- shards ---------------------------------------------------------------------------------


def test_shards_two_whole_shards_per_client() -> None:
    # Prepare: 22 rows already sorted by category (a x8, b x8, c x6).
    # 2 clients * 2 shards = 4 shards of floor(22 / 4) = 5 rows; the last 2 rows are dropped.
    ds = make_ds(["a"] * 8 + ["b"] * 8 + ["c"] * 6)

    # Execute
    parts = partition_dataset(ds, name="shards", num_partitions=2, shards_per_client=2, seed=0)

    # Assert: each client holds exactly two shards {5k, ..., 5k+4}, and the four differ
    assert [len(p) for p in parts] == [10, 10]
    shards_of = []
    for p in parts:
        ids = sorted(row_ids(p))
        blocks = sorted({i // 5 for i in ids})
        assert len(blocks) == 2
        assert ids == [i for b in blocks for i in range(5 * b, 5 * b + 5)]
        shards_of.append(blocks)
    assert sorted(shards_of[0] + shards_of[1]) == [0, 1, 2, 3]


def test_shards_sort_by_column_first() -> None:
    # Unsorted input: after sorting, the 6 rows are a a a b b b and 2 clients * 1 shard = 2 shards
    # of 3 rows, so each client gets exactly one category.
    ds = make_ds(["b", "a", "b", "a", "b", "a"])
    parts = partition_dataset(ds, name="shards", num_partitions=2, shards_per_client=1, seed=0)
    assert sorted(tuple(sorted(set(p["category"]))) for p in parts) == [("a",), ("b",)]
    assert [len(p) for p in parts] == [3, 3]


def test_shards_is_seeded() -> None:
    ds = make_ds(["a"] * 10 + ["b"] * 10)

    def run() -> list[list[int]]:
        parts = partition_dataset(ds, name="shards", num_partitions=2, shards_per_client=2, seed=5)
        return [row_ids(p) for p in parts]

    assert run() == run()


def test_shards_too_few_rows() -> None:
    ds = make_ds(["a"] * 5)
    with pytest.raises(FedtuneError, match=r"partition\.shards_per_client"):
        partition_dataset(ds, name="shards", num_partitions=3, shards_per_client=2)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_name() -> None:
    with pytest.raises(FedtuneError, match=r"partition\.name: unknown partitioner 'bogus'"):
        partition_dataset(make_ds(["a", "b"]), name="bogus", num_partitions=2)


@pytest.mark.parametrize(
    ("key", "value"),
    [("num_partitions", 0), ("min_partition_size", 0), ("shards_per_client", -1), ("alpha", 0.0)],
)
def test_non_positive_values(key: str, value: float) -> None:
    kwargs: dict[str, Any] = {"num_partitions": 2, key: value}
    with pytest.raises(FedtuneError, match=rf"partition\.{key}"):
        partition_dataset(make_ds(["a", "b", "a", "b"]), name="dirichlet", **kwargs)


def test_more_partitions_than_rows() -> None:
    with pytest.raises(FedtuneError, match=r"partition\.num_partitions=3 exceeds the 2 examples"):
        partition_dataset(make_ds(["a", "b"]), name="iid", num_partitions=3)


def test_missing_column() -> None:
    with pytest.raises(FedtuneError, match=r"partition\.column='topic'"):
        partition_dataset(make_ds(["a", "b"]), name="dirichlet", num_partitions=2, column="topic")


def test_empty_partition_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A scheme that leaves client 1 empty; the built-in ones cannot once the checks pass.
    def lopsided(ds: Dataset, _: object) -> list[Dataset]:
        return [ds, ds.select([])]

    monkeypatch.setitem(PARTITIONERS._items, "lopsided", lopsided)
    with pytest.raises(FedtuneError, match=r"partition 1 is empty \(partition\.name='lopsided'"):
        partition_dataset(make_ds(["a", "b"]), name="lopsided", num_partitions=2)


# --- train/test split -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "sizes"),
    [
        (10, 0.2, (8, 2)),  # round(2.0) = 2
        (10, 0.3, (7, 3)),  # 10 * 0.3 = 3.0000000000000004 rounds to 3, not up to 4
        (2, 0.1, (1, 1)),  # round(0.2) = 0, raised to 1
        (3, 0.9, (1, 2)),  # round(2.7) = 3, lowered to n - 1 = 2
    ],
)
def test_split_sizes(n: int, fraction: float, sizes: tuple[int, int]) -> None:
    train, test = split_train_test(make_ds(["a"] * n), fraction, seed=0)
    assert (len(train), len(test)) == sizes
    assert sorted(row_ids(train) + row_ids(test)) == list(range(n))


def test_split_is_seeded() -> None:
    ds = make_ds(["a"] * 20)
    first = split_train_test(ds, 0.25, seed=1)
    again = split_train_test(ds, 0.25, seed=1)
    assert row_ids(first[1]) == row_ids(again[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_bad_fraction(fraction: float) -> None:
    with pytest.raises(FedtuneError, match=r"data\.test_fraction"):
        split_train_test(make_ds(["a"] * 10), fraction, seed=0)


def test_split_too_small() -> None:
    with pytest.raises(FedtuneError, match=r"too small.*data\.test_fraction"):
        split_train_test(make_ds(["a"]), 0.5, seed=0)


# --- counts and table -----------------------------------------------------------------------


def test_partition_counts() -> None:
    parts = [make_ds(["a", "b", "a"]), make_ds(["c"]), make_ds(["b", "b"])]
    assert partition_counts(parts, "category") == {0: {"a": 2, "b": 1}, 1: {"c": 1}, 2: {"b": 2}}


def test_partition_table() -> None:
    # totals: b = 1 + 2 = 3, a = 2, c = 1 -> columns b, a, c
    parts = [make_ds(["a", "b", "a"]), make_ds(["c"]), make_ds(["b", "b"])]
    table = partition_table(parts, "category")
    assert [str(c.header) for c in table.columns] == ["client", "b", "a", "c", "total"]

    console = Console(width=120, record=True)
    console.print(table)
    lines = [" ".join(line.replace("│", " ").split()) for line in console.export_text().splitlines()]
    assert "client 0 1 2 0 3" in lines
    assert "client 1 0 0 1 1" in lines
    assert "client 2 2 0 0 2" in lines
    assert "total 3 2 1 6" in lines
