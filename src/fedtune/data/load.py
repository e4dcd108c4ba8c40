"""Read raw records (local files or the hub), convert them to conversations, write them back.

Local files are read record by record with their position (``path:LINE`` for JSON lines,
``path: record N`` otherwise) so that every conversion error names the record at fault.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from fedtune.data.builtin import BUILTINS
from fedtune.data.formats import WRITERS, convert_record, to_format
from fedtune.data.types import WHERE, Conversation
from fedtune.errors import FedtuneError
from fedtune.io import atomic_file

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
WRITE_SUFFIXES = (".json", ".jsonl")

Located = tuple[str, Any]  # (where, record)


# --------------------------------------------------------------------------- local readers


def _jsonl_records(path: Path, text: str) -> list[Located]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise FedtuneError(f"{path}:{lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    return records


def _json_records(path: Path, text: str) -> list[Located]:
    """A JSON array, a single JSON object, or JSON lines in a ``.json`` file."""
    if not text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return _jsonl_records(path, text)  # several objects: JSON lines
        return [(f"{path}: record 0", doc)]
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FedtuneError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    return [(f"{path}: record {i}", rec) for i, rec in enumerate(doc)]


def _csv_records(path: Path, text: str) -> list[Located]:
    rows = csv.DictReader(io.StringIO(text, newline=""))
    return [(f"{path}: record {i}", dict(row)) for i, row in enumerate(rows)]


def read_local(path: Path) -> list[Located]:
    """Every record of a local file with where it is; errors name the file (and line)."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise FedtuneError(
            f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}"
        )
    if not path.is_file():
        raise FedtuneError(f"{path}: no such file")
    if suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise FedtuneError(f"{path}: cannot read parquet ({exc})") from None
        records = [(f"{path}: record {i}", row) for i, row in enumerate(rows)]
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM (Excel exports)
        except UnicodeDecodeError as exc:
            raise FedtuneError(f"{path}: not UTF-8 text ({exc})") from None
        reader = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records}[suffix]
        records = reader(path, text)
    if not records:
        raise FedtuneError(f"{path}: the file holds no records")
    for where, record in records:
        if not isinstance(record, dict):
            raise FedtuneError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    return records


def _is_local(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or Path(source).exists()


def _hub_records(source: str, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "not loadable"
        raise FedtuneError(
            f"could not load dataset {source!r} (split {split!r}): {exc}; expected a local "
            f"{'/'.join(LOCAL_SUFFIXES)} file or a built-in name ({', '.join(BUILTINS.names())})"
        ) from None
    if not isinstance(ds, datasets.Dataset):
        raise FedtuneError(f"dataset {source!r} did not give one split for {split!r}")
    return ds


def iter_records(source: str, split: str = "train") -> Iterator[Located]:
    """Every raw record of ``source`` (a local file or a hub name) with where it is."""
    if _is_local(source):
        yield from read_local(Path(source))
        return
    for i, rec in enumerate(_hub_records(source, split)):
        yield f"{source}[{split}] record {i}", rec


def read_records(source: str, split: str = "train") -> datasets.Dataset:
    """Read raw records from a local file or the hub.

    Parameters
    ----------
    source
        A ``.json`` (array or JSON lines), ``.jsonl``, ``.csv`` or ``.parquet`` path, or a
        ``datasets`` hub name.
    split
        The split of a hub dataset; ignored for local files.

    Raises
    ------
    FedtuneError
        For a missing, empty or malformed file (naming ``path:line``), records whose fields
        have inconsistent types, or a hub dataset that cannot be loaded.
    """
    if not _is_local(source):
        return _hub_records(source, split)
    located = read_local(Path(source))
    try:
        return datasets.Dataset.from_list([rec for _, rec in located])
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise FedtuneError(f"{source}: records do not share one schema ({exc})") from None


# --------------------------------------------------------------------------- conversion


def _category(record: Any, field: str, where: str) -> str:
    value = record.get(field) if isinstance(record, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, str | int):
        return str(value)
    raise FedtuneError(f"{where}: field {field!r} must be a string, not {type(value).__name__}")


def iter_conversations(
    source: str, fmt: str, *, split: str = "train", category_field: str = "category", explain: bool = False
) -> Iterator[tuple[str, Conversation, str]]:
    """``(where, conversation, category)`` for every record of ``source``; built-ins ignore ``fmt``."""
    if source in BUILTINS and not Path(source).exists():
        ds = BUILTINS.get(source)()
        for i, (conv, category) in enumerate(zip(ds["messages"], ds["category"], strict=True)):
            yield f"{source} record {i}", conv, category
        return
    for where, record in iter_records(source, split):
        conv = convert_record(record, fmt, where, explain=explain)
        yield where, conv, _category(record, category_field, where)


def load_conversations(
    source: str,
    fmt: str,
    *,
    split: str = "train",
    category_field: str = "category",
    explain: bool = False,
) -> datasets.Dataset:
    """Load ``source`` and convert every record to a conversation.

    Parameters
    ----------
    source
        A local file, a hub dataset name, or a built-in name (:data:`BUILTINS`).
    fmt
        The records' format, a name in :data:`fedtune.data.formats.FORMATS`; ignored for
        built-ins, which are already converted.
    split
        The hub split.
    category_field
        The record field read into ``category`` ("" where absent).
    explain
        Answer records with an ``explanation`` field in EXPLAIN/CONCLUSION form.

    Returns
    -------
    datasets.Dataset
        Columns ``messages`` (list of ``{role, content}``), ``category`` (str) and
        :data:`~fedtune.data.types.WHERE` (the record's ``path:line``, for later errors).
    """
    messages: list[Conversation] = []
    categories: list[str] = []
    wheres: list[str] = []
    for where, conv, category in iter_conversations(
        source, fmt, split=split, category_field=category_field, explain=explain
    ):
        messages.append(conv)
        categories.append(category)
        wheres.append(where)
    log.info("loaded %d conversations from %s", len(messages), source)
    return datasets.Dataset.from_dict({"messages": messages, "category": categories, WHERE: wheres})


def _writable(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in WRITE_SUFFIXES:
        raise FedtuneError(
            f"{path}: cannot write {path.suffix!r} files; use one of {', '.join(WRITE_SUFFIXES)}"
        )
    return path


def write_records(records: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write records as ``.jsonl`` (one per line) or ``.json`` (an array), atomically.

    The file appears complete or not at all: records go to a temporary file in the same
    folder, which replaces ``path`` only once everything is written. Returns the count.
    """
    path = _writable(path)
    rows = list(records)
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        if path.suffix.lower() == ".jsonl":
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            json.dump(rows, out, ensure_ascii=False, indent=2)
            out.write("\n")
    return len(rows)


def convert_file(src: str, src_format: str, dst: str | Path, dst_format: str, explain: bool = False) -> int:
    """Convert every record of ``src`` to ``dst_format`` and write ``dst``.

    Nothing is written if any record fails. ``src`` may be a built-in name (``src_format`` is
    then ignored).

    Returns
    -------
    int
        The number of records written.
    """
    WRITERS.get(dst_format, where="data convert")  # fail before reading a large source
    _writable(dst)
    rows = [
        to_format(conv, dst_format, category, where)
        for where, conv, category in iter_conversations(src, src_format, explain=explain)
    ]
    count = write_records(rows, dst)
    log.info("wrote %d %s records to %s", count, dst_format, dst)
    return count
