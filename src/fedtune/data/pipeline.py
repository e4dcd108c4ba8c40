"""From the config to one client's train/test data: load -> partition -> split -> tokenize.

Conversion and partitioning results are memoised per process (keyed by the config
sections they depend on), so a simulation worker serving many clients reads and
partitions the corpus once.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config, DataConfig, PartitionConfig
from fedtune.data.builtin import BUILTINS
from fedtune.data.formats import FORMATS
from fedtune.data.load import load_conversations
from fedtune.data.partition import PARTITIONERS, partition_dataset, split_train_test
from fedtune.data.templates import TEMPLATES
from fedtune.data.tokenize import tokenize_dataset
from fedtune.errors import FedtuneError
from fedtune.rag.client import augment_split


@lru_cache(maxsize=4)
def _partitions(data: DataConfig, part: PartitionConfig, seed: int) -> tuple[Dataset, ...]:
    check_names(data, part)
    ds = load_conversations(data.source, data.format, split=data.split, category_field=part.column)
    if part.column not in ds.column_names:  # the field was read into "category": name it as the user did
        ds = ds.rename_column("category", part.column)
    return tuple(
        partition_dataset(
            ds,
            name=part.name,
            num_partitions=part.num_partitions,
            column=part.column,
            alpha=part.alpha,
            min_partition_size=part.min_partition_size,
            shards_per_client=part.shards_per_client,
            seed=seed,
        )
    )


def check_names(data: DataConfig, part: PartitionConfig) -> None:
    """Unknown format, template or partitioner names fail before any data is read."""
    if data.source not in BUILTINS:
        FORMATS.get(data.format, where="data.format")
    TEMPLATES.get(data.template, where="data.template")
    PARTITIONERS.get(part.name, where="partition.name")


def partitions(cfg: Config) -> list[Dataset]:
    """Every client's conversations (before the held-out split)."""
    return list(_partitions(cfg.data, cfg.partition, cfg.seed))


def _cap(ds: Dataset, limit: int | None) -> Dataset:
    return ds if limit is None or len(ds) <= limit else ds.select(range(limit))


def client_conversations(
    cfg: Config, partition_id: int, *, data_path: str | None = None
) -> tuple[Dataset, Dataset]:
    """One client's (train, test) conversations.

    ``data_path`` (a SuperNode's ``node-config``) makes the client use its own file
    whole, in ``data.format``, instead of a partition of the shared source.
    """
    if data_path:
        ds = load_conversations(
            data_path, cfg.data.format, split=cfg.data.split, category_field=cfg.partition.column
        )
    else:
        parts = partitions(cfg)
        if not 0 <= partition_id < len(parts):
            raise FedtuneError(
                f"partition-id {partition_id} is out of range (partition.num_partitions={len(parts)})"
            )
        ds = parts[partition_id]
    train, test = split_train_test(ds, cfg.data.test_fraction, cfg.seed + partition_id)
    return _cap(train, cfg.data.max_train_examples), _cap(test, cfg.data.max_test_examples)


def client_examples(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    partition_id: int,
    *,
    data_path: str | None = None,
    state_dir: str | None = None,
    case_base: str | None = None,
) -> tuple[Dataset, Dataset]:
    """One client's (train, test) conversations as the model sees them.

    With ``rag.enabled`` each example has evidence in front of its question
    (:func:`fedtune.rag.client.augment_split`); the arguments are :func:`client_tokenized`'s.
    """
    train, test = client_conversations(cfg, partition_id, data_path=data_path)
    if cfg.rag.enabled:
        train, test = augment_split(
            cfg, tokenizer, train, test, state_dir=state_dir, source=case_base, seed=cfg.seed + partition_id
        )
    return train, test


def client_tokenized(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    partition_id: int,
    *,
    data_path: str | None = None,
    state_dir: str | None = None,
    case_base: str | None = None,
) -> tuple[Dataset, Dataset]:
    """One client's (train, test) examples, tokenized with ``data.template`` and its length limits.

    With ``rag.enabled`` each example first gets evidence in front of its question
    (:func:`fedtune.rag.client.augment_split`): ``state_dir`` is where the client's case base
    is indexed (unset: the fedtune cache), ``case_base`` the SuperNode's own case-base source.
    """
    train, test = client_examples(
        cfg, tokenizer, partition_id, data_path=data_path, state_dir=state_dir, case_base=case_base
    )
    kw: dict[str, Any] = {
        "template_name": cfg.data.template,
        "max_source_length": cfg.data.max_source_length,
        "max_target_length": cfg.data.max_target_length,
    }
    return tokenize_dataset(train, tokenizer, **kw), tokenize_dataset(test, tokenizer, **kw)
