"""Split a converted dataset into per-client partitions with flwr-datasets partitioners.

Every scheme is a thin wrapper over a partitioner from :mod:`flwr_datasets.partitioner`
(``partitioner.dataset = ds`` then ``partitioner.load_partition(i)``); this module adds
the checks a user needs (errors that name the config key), seeding and ordering.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    ShardPartitioner,
)
from rich.table import Table

from fedtune.data.types import WHERE
from fedtune.errors import FedtuneError
from fedtune.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "PARTITIONERS",
    "PartitionParams",
    "partition_counts",
    "partition_dataset",
    "partition_table",
    "split_train_test",
]


@dataclass(frozen=True)
class PartitionParams:
    """The knobs of every partitioning scheme; each scheme reads the ones it needs.

    Parameters
    ----------
    num_partitions
        Number of clients.
    column
        Column to partition by (``category`` for converted datasets); unused by ``iid``.
    alpha
        Dirichlet concentration; small values give skewed clients.
    min_partition_size
        Dirichlet: the least number of examples any client may receive.
    shards_per_client
        Shards: how many sorted shards each client receives.
    seed
        Seed of every random choice.
    """

    num_partitions: int
    column: str = "category"
    alpha: float = 0.5
    min_partition_size: int = 2
    shards_per_client: int = 2
    seed: int = 0


PartitionFn = Callable[[Dataset, PartitionParams], list[Dataset]]
PARTITIONERS: Registry[PartitionFn] = Registry("partitioner")


def _load_all(partitioner: Partitioner, ds: Dataset, ids: Sequence[int]) -> list[Dataset]:
    partitioner.dataset = ds
    return [partitioner.load_partition(i) for i in ids]


@PARTITIONERS.register("iid")
def _iid(ds: Dataset, p: PartitionParams) -> list[Dataset]:
    # IidPartitioner cuts contiguous shards and takes no seed, so shuffle first.
    return _load_all(IidPartitioner(p.num_partitions), ds.shuffle(seed=p.seed), range(p.num_partitions))


@PARTITIONERS.register("category")
def _category(ds: Dataset, p: PartitionParams) -> list[Dataset]:
    values = ds[p.column]
    counts = Counter(values)
    if p.num_partitions > len(counts):
        raise FedtuneError(
            f"partition.num_partitions={p.num_partitions} exceeds the {len(counts)} distinct "
            f"values of column {p.column!r} (partition.name='category' gives one client per value)"
        )
    ranked = sorted(counts, key=lambda value: (-counts[value], str(value)))
    kept = ranked[: p.num_partitions]
    kept_set = set(kept)
    rows = [i for i, value in enumerate(values) if value in kept_set]
    partitioner = NaturalIdPartitioner(partition_by=p.column)
    partitioner.dataset = ds.select(rows)
    # NaturalIdPartitioner numbers values in sorted order; we want largest first.
    _ = partitioner.num_partitions  # builds the id mapping
    id_of = {value: pid for pid, value in partitioner.partition_id_to_natural_id.items()}
    return [partitioner.load_partition(id_of[value]) for value in kept]


@PARTITIONERS.register("dirichlet")
def _dirichlet(ds: Dataset, p: PartitionParams) -> list[Dataset]:
    partitioner = DirichletPartitioner(
        num_partitions=p.num_partitions,
        partition_by=p.column,
        alpha=float(p.alpha),
        min_partition_size=p.min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=p.seed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parts = _load_all(partitioner, ds, range(p.num_partitions))
        except ValueError as err:
            raise FedtuneError(
                f"dirichlet partitioning failed: no draw gave every client at least "
                f"partition.min_partition_size={p.min_partition_size} examples "
                f"({len(ds)} examples, partition.num_partitions={p.num_partitions}, "
                f"partition.alpha={p.alpha}); lower the minimum or raise alpha ({err})"
            ) from None
    for w in caught:
        logger.debug("dirichlet resampled: %s", w.message)
    return parts


@PARTITIONERS.register("shards")
def _shards(ds: Dataset, p: PartitionParams) -> list[Dataset]:
    num_shards = p.num_partitions * p.shards_per_client
    if len(ds) < num_shards:
        raise FedtuneError(
            f"{len(ds)} examples cannot be cut into partition.num_partitions * "
            f"partition.shards_per_client = {p.num_partitions} * {p.shards_per_client} "
            f"= {num_shards} shards"
        )
    # FedIT's scheme: sort by column, cut into equal shards (the remainder is dropped),
    # deal shards_per_client random shards to each client.
    partitioner = ShardPartitioner(
        num_partitions=p.num_partitions,
        partition_by=p.column,
        num_shards_per_partition=p.shards_per_client,
        shuffle=True,
        seed=p.seed,
    )
    with warnings.catch_warnings():
        # datasets' sort passes a pyarrow option that pyarrow>=25 deprecates; not ours to fix.
        warnings.filterwarnings("ignore", message=".*null_placement.*", category=FutureWarning)
        return _load_all(partitioner, ds, range(p.num_partitions))


def _check_params(ds: Dataset, name: str, p: PartitionParams) -> None:
    for key, value in (
        ("num_partitions", p.num_partitions),
        ("min_partition_size", p.min_partition_size),
        ("shards_per_client", p.shards_per_client),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FedtuneError(f"partition.{key} must be a positive integer, got {value!r}")
    if not p.alpha > 0:
        raise FedtuneError(f"partition.alpha must be > 0, got {p.alpha!r}")
    if p.num_partitions > len(ds):
        raise FedtuneError(
            f"partition.num_partitions={p.num_partitions} exceeds the {len(ds)} examples in the dataset"
        )
    if name == "iid":
        return
    if p.column not in ds.column_names:
        raise FedtuneError(
            f"partition.column={p.column!r} is not a dataset column (columns: {', '.join(ds.column_names)})"
        )
    # A blank value would otherwise become a client (or a label) of its own.
    blank = [i for i, value in enumerate(ds[p.column]) if value is None or not str(value).strip()]
    if blank:
        where = ds[WHERE][blank[0]] if WHERE in ds.column_names else f"record {blank[0]}"
        raise FedtuneError(
            f"{where}: field {p.column!r} is missing or blank; partition.name={name!r} assigns "
            f"clients by partition.column={p.column!r}, so every record needs one "
            f"({len(blank)} of {len(ds)} records lack it)"
        )


def partition_dataset(
    ds: Dataset,
    *,
    name: str,
    num_partitions: int,
    column: str = "category",
    alpha: float = 0.5,
    min_partition_size: int = 2,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[Dataset]:
    """Split ``ds`` into ``num_partitions`` client datasets.

    Parameters
    ----------
    ds
        A converted dataset (columns ``messages`` and ``category``, or any with ``column``).
    name
        Scheme from :data:`PARTITIONERS`: ``iid`` (seeded shuffle, equal sizes),
        ``category`` (one client per value of ``column``, the ``num_partitions`` largest,
        largest first, ties by name), ``dirichlet`` (per-value Dirichlet(``alpha``)
        proportions, at least ``min_partition_size`` each) or ``shards`` (FedIT: sort by
        ``column``, ``num_partitions * shards_per_client`` equal shards, remainder dropped).
    num_partitions, column, alpha, min_partition_size, shards_per_client, seed
        See :class:`PartitionParams`.

    Returns
    -------
    list of Dataset
        One dataset per client, in client order.

    Raises
    ------
    FedtuneError
        Unknown scheme, bad parameter, a record without a ``column`` value (naming its
        ``where`` column, e.g. ``data.jsonl:12``, when ``ds`` has one) for a scheme other
        than ``iid``, or a scheme that leaves a client empty.
    """
    scheme = PARTITIONERS.get(name, where="partition.name")
    params = PartitionParams(
        num_partitions=num_partitions,
        column=column,
        alpha=alpha,
        min_partition_size=min_partition_size,
        shards_per_client=shards_per_client,
        seed=seed,
    )
    _check_params(ds, name, params)
    parts = scheme(ds, params)
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise FedtuneError(
                f"partition {i} is empty (partition.name={name!r}, "
                f"partition.num_partitions={num_partitions}, {len(ds)} examples)"
            )
    logger.info("partitioned %d examples with %r into sizes %s", len(ds), name, [len(p) for p in parts])
    return parts


def split_train_test(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a seeded test split from one client's partition.

    The test size is ``round(len(ds) * test_fraction)``, clamped so that both splits
    keep at least one example.

    Parameters
    ----------
    ds
        One client's partition; needs at least 2 examples.
    test_fraction
        Fraction held out, strictly between 0 and 1.
    seed
        Shuffle seed.

    Returns
    -------
    tuple of Dataset
        ``(train, test)``.
    """
    if not 0 < test_fraction < 1:
        raise FedtuneError(f"data.test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    n = len(ds)
    if n < 2:
        raise FedtuneError(
            f"a partition of {n} example(s) is too small to hold out data.test_fraction={test_fraction}; "
            "use fewer partitions or more data"
        )
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    split = ds.train_test_split(test_size=n_test, shuffle=True, seed=seed)
    return split["train"], split["test"]


def partition_counts(parts: Sequence[Dataset], column: str) -> dict[int, dict[str, int]]:
    """Count examples per value of ``column`` in each partition.

    Returns
    -------
    dict
        ``{client: {value: count}}`` with only the values present in that client.
    """
    counts: dict[int, dict[str, int]] = {}
    for i, part in enumerate(parts):
        if column not in part.column_names:
            raise FedtuneError(f"partition.column={column!r} is not a column of partition {i}")
        counts[i] = dict(Counter(str(value) for value in part[column]))
    return counts


def partition_table(parts: Sequence[Dataset], column: str) -> Table:
    """A clients x values count table (largest value first) with totals, for ``fedtune partition``."""
    counts = partition_counts(parts, column)
    totals: Counter[str] = Counter()
    for per_client in counts.values():
        totals.update(per_client)
    values = sorted(totals, key=lambda value: (-totals[value], value))

    table = Table(title=f"{len(parts)} clients by {column}")
    table.add_column("client")
    for value in values:
        table.add_column(value, justify="right")
    table.add_column("total", justify="right", style="bold")
    for i, per_client in counts.items():
        cells = [str(per_client.get(value, 0)) for value in values]
        table.add_row(f"client {i}", *cells, str(sum(per_client.values())))
    table.add_row("total", *(str(totals[value]) for value in values), str(sum(totals.values())), style="bold")
    return table
