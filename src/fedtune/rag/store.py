"""A knowledge base on disk: passages, a dense faiss index and a bm25s lexical index, one folder.

Folder layout (row ``i`` is the same passage everywhere)::

    manifest.json    format, version, embedder (name, dim, probe), lexical, count, chunking
    passages.jsonl   {"id", "source", "text"} per line
    dense.faiss      faiss IndexFlatIP over unit-length embeddings (cosine, exact)
    bm25/            bm25s index (English stop words, Snowball English stems)

``lexical`` records how the BM25 tokens were made (``stopwords``, ``stemmer``); queries are
tokenised the same way. A base written before stemming has no ``lexical`` and is read as
built (no stemmer).

Builds and additions write a new folder and swap it in (:func:`fedtune.io.atomic_folder`):
a crash leaves the old base or the new one. Equal passages (by :func:`text_hash`) are kept once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import bm25s
import faiss
import numpy as np
import Stemmer

from fedtune.errors import FedtuneError
from fedtune.io import atomic_folder
from fedtune.rag.embed import DEFAULT_EMBEDDER, embed, load_embedder, probe, same_embedder
from fedtune.rag.fusion import rrf
from fedtune.rag.sources import Passage

# bm25s sets its logger to DEBUG on import, so every index build logs a line through the
# application's handlers; put it back to the usual threshold
logging.getLogger("bm25s").setLevel(logging.WARNING)

Mode = Literal["bm25", "dense", "hybrid"]
MODES: tuple[Mode, ...] = ("bm25", "dense", "hybrid")
FORMAT, VERSION = "fedtune-kb", 1
MANIFEST, PASSAGES, DENSE, BM25 = "manifest.json", "passages.jsonl", "dense.faiss", "bm25"
STOPWORDS = "en"
LEXICAL = {"stopwords": STOPWORDS, "stemmer": "english"}  # a new base's BM25 tokens (PyStemmer)
Ranking = list[tuple[int, float]]  # (passage row, retriever score), best first


@dataclass(frozen=True)
class Hit:
    """One retrieved passage: its rank and RRF score, and its rank and raw score in each retriever.

    ``bm25`` and ``dense`` are ``(rank, score)`` (BM25 score, cosine), None where that retriever
    did not find the passage (or was not asked).
    """

    passage: Passage
    rank: int
    score: float
    bm25: tuple[int, float] | None = None
    dense: tuple[int, float] | None = None


def _stemmer(manifest: dict[str, Any]) -> Any:
    """The manifest's BM25 stemmer (PyStemmer), None for a base built without one."""
    name = manifest.get("lexical", {}).get("stemmer")
    return Stemmer.Stemmer(name) if name else None


def _tokens(texts: list[str], stemmer: Any) -> list[list[str]]:
    tokens: list[list[str]] = bm25s.tokenize(
        texts, stopwords=STOPWORDS, stemmer=stemmer, return_ids=False, show_progress=False
    )
    return tokens


def _write(folder: Path, manifest: dict[str, Any], passages: list[Passage], vectors: np.ndarray) -> None:
    with (folder / PASSAGES).open("w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"id": p.id, "source": p.source, "text": p.text}, ensure_ascii=False) + "\n")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(folder / DENSE))
    lexical = bm25s.BM25()
    lexical.index(_tokens([p.text for p in passages], _stemmer(manifest)), show_progress=False)
    lexical.save(str(folder / BM25), show_progress=False)
    (folder / MANIFEST).write_text(
        json.dumps({**manifest, "count": len(passages)}, indent=1), encoding="utf-8"
    )


def _unique(passages: Iterable[Passage], seen: set[str]) -> list[Passage]:
    out = []
    for p in passages:
        if p.hash not in seen:
            seen.add(p.hash)
            out.append(p)
    return out


def build(
    passages: Iterable[Passage],
    out: str | Path,
    *,
    embedder: str = DEFAULT_EMBEDDER,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> KnowledgeBase:
    """Index ``passages`` (deduplicated) into the folder ``out``, atomically; returns it opened.

    ``info`` (chunking, sources) is kept in the manifest. An empty base is refused, and so
    is an ``out`` that exists and is neither a knowledge base nor an empty folder (it would
    be replaced).
    """
    _refuse_foreign(Path(out))
    unique = _unique(passages, set())
    if not unique:
        raise FedtuneError(f"{out}: nothing to index (the source has no non-blank text)")
    model = load_embedder(embedder)
    vectors = embed(model, [p.text for p in unique], progress=progress)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "embedder": {"name": embedder, "dim": int(vectors.shape[1]), "probe": probe(model)},
        "lexical": LEXICAL,
        **(info or {}),
    }
    with atomic_folder(out) as staging:
        _write(staging, manifest, unique, vectors)
    return KnowledgeBase.open(out)


def add(
    path: str | Path,
    passages: Iterable[Passage],
    *,
    embedder: str | None = None,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> tuple[KnowledgeBase, int]:
    """Add passages to the base at ``path``, duplicates skipped; returns it reopened and the number added.

    ``embedder`` (default: the base's own) is checked against the base as for a query.
    ``info`` updates the manifest's own keys (as in :func:`build`) when anything is added.
    """
    kb = KnowledgeBase.open(path, embedder=embedder)
    new = _unique(passages, {p.hash for p in kb.passages})
    if not new:
        return kb, 0
    model = kb.embedder()
    vectors = np.concatenate([kb.dense_vectors(), embed(model, [p.text for p in new], progress=progress)])
    with atomic_folder(kb.path) as staging:
        _write(staging, {**kb.manifest, **(info or {})}, [*kb.passages, *new], vectors)
    return KnowledgeBase.open(path), len(new)


def _refuse_foreign(out: Path) -> None:
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FedtuneError(
            f"{out}: exists and is not a knowledge base; not replacing it (choose another folder)"
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not path.is_dir():
        raise FedtuneError(f"{path}: no knowledge base here (build one: fedtune kb build SOURCE {path})")
    if not file.is_file():
        raise FedtuneError(
            f"{path}: not a knowledge base (no {MANIFEST}; build one: fedtune kb build SOURCE {path})"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FedtuneError(f"{file}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FedtuneError(f"{file}: not a fedtune knowledge-base manifest")
    if manifest.get("version") != VERSION:
        raise FedtuneError(
            f"{file}: knowledge-base version {manifest.get('version')!r}; this fedtune reads {VERSION}"
        )
    for key in ("embedder", "count"):
        if key not in manifest:
            raise FedtuneError(f"{file}: corrupt manifest (no {key!r})")
    stemmer = manifest.get("lexical", {}).get("stemmer")
    if stemmer and stemmer not in Stemmer.algorithms():
        raise FedtuneError(
            f"{file}: unknown lexical stemmer {stemmer!r} (PyStemmer has: {', '.join(Stemmer.algorithms())})"
        )
    return manifest


def _read_passages(file: Path, count: int) -> list[Passage]:
    if not file.is_file():
        raise FedtuneError(f"{file}: missing; the knowledge base is incomplete, rebuild it")
    passages = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                passages.append(Passage(id=str(row["id"]), source=str(row["source"]), text=str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise FedtuneError(f"{file}:{lineno}: corrupt passage ({exc})") from None
    if len(passages) != count:
        raise FedtuneError(
            f"{file}: {len(passages)} passages but the manifest says {count}; rebuild the base"
        )
    return passages


class KnowledgeBase:
    """An opened knowledge-base folder; searches by ``bm25``, ``dense`` or ``hybrid`` (RRF of both).

    Parameters
    ----------
    path
        The folder :func:`build` wrote.
    embedder
        The query embedder (default: the one the base was built with). One that makes other
        vectors than the base's is refused when a dense search first needs it.
    """

    def __init__(
        self, path: Path, manifest: dict[str, Any], passages: list[Passage], embedder: str | None
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.passages = passages
        self.embedder_name = embedder or str(manifest["embedder"]["name"])

    @classmethod
    def open(cls, path: str | Path, *, embedder: str | None = None) -> KnowledgeBase:
        path = Path(path)
        manifest = _read_manifest(path)
        passages = _read_passages(path / PASSAGES, int(manifest["count"]))
        for name in (DENSE, BM25):
            if not (path / name).exists():
                raise FedtuneError(f"{path / name}: missing; the knowledge base is incomplete, rebuild it")
        return cls(path, manifest, passages, embedder)

    def __len__(self) -> int:
        return len(self.passages)

    def embedder(self) -> Any:
        """The query embedder, loaded and checked against the base's probe once per opened base."""
        return self._checked_embedder

    @cached_property
    def _checked_embedder(self) -> Any:
        # cached: the probe is a forward pass, as costly as the query itself (a mismatch is not
        # cached, so it raises on every dense query)
        model = load_embedder(self.embedder_name)
        recorded = self.manifest["embedder"]
        if not same_embedder(recorded["probe"], model):
            raise FedtuneError(
                f"{self.path}: built with embedder {recorded['name']!r}; the query embedder "
                f"{self.embedder_name!r} makes other vectors (rebuild the base or use its embedder)"
            )
        return model

    @cached_property
    def _dense(self) -> Any:
        try:
            index = faiss.read_index(str(self.path / DENSE))
        except RuntimeError as exc:
            raise FedtuneError(f"{self.path / DENSE}: corrupt dense index ({exc})") from None
        if index.ntotal != len(self):
            raise FedtuneError(
                f"{self.path / DENSE}: {index.ntotal} vectors for {len(self)} passages; rebuild the base"
            )
        return index

    @cached_property
    def _lexical(self) -> Any:
        try:
            return bm25s.BM25.load(str(self.path / BM25), show_progress=False)
        except (OSError, ValueError, KeyError) as exc:
            raise FedtuneError(f"{self.path / BM25}: corrupt bm25 index ({exc})") from None

    @cached_property
    def _stem(self) -> Any:
        return _stemmer(self.manifest)

    def dense_vectors(self) -> np.ndarray:
        """Every passage's stored embedding (rows in passage order)."""
        return np.asarray(self._dense.reconstruct_n(0, self._dense.ntotal), dtype=np.float32)

    def bm25_ranking(self, queries: list[str], depth: int) -> list[Ranking]:
        """(row, BM25 score) per query, best first; only passages sharing a term with the query."""
        docs, scores = self._lexical.retrieve(
            _tokens(queries, self._stem), k=min(depth, len(self)), show_progress=False
        )
        return [
            [(int(d), float(s)) for d, s in zip(row, srow, strict=True) if s > 0]
            for row, srow in zip(docs, scores, strict=True)
        ]

    def dense_ranking(self, queries: list[str], depth: int) -> list[Ranking]:
        """(row, cosine) per query by similarity to the query embedding, best first."""
        vectors = embed(self.embedder(), queries)
        scores, rows = self._dense.search(vectors, min(depth, len(self)))
        return [
            [(int(r), float(s)) for r, s in zip(row, srow, strict=True) if r >= 0]
            for row, srow in zip(rows, scores, strict=True)
        ]

    def search_many(
        self,
        queries: Sequence[str],
        *,
        k: int = 5,
        mode: Mode = "hybrid",
        exclude: Sequence[frozenset[str]] = (),
    ) -> list[list[Hit]]:
        """The top ``k`` passages per query; ``exclude[i]``: passage hashes query ``i`` must not get."""
        if mode not in MODES:
            raise FedtuneError(f"retrieval mode {mode!r}: expected one of {', '.join(MODES)}")
        if k <= 0:
            raise FedtuneError(f"k must be a positive number of passages, got {k}")
        queries = list(queries)
        excl = list(exclude) or [frozenset()] * len(queries)
        depth = max(4 * k, 20) + max((len(e) for e in excl), default=0)
        lex = self.bm25_ranking(queries, depth) if mode != "dense" else [[] for _ in queries]
        den = self.dense_ranking(queries, depth) if mode != "bm25" else [[] for _ in queries]
        return [self._hits(b, d, e, k, mode) for b, d, e in zip(lex, den, excl, strict=True)]

    def search(
        self, query: str, *, k: int = 5, mode: Mode = "hybrid", exclude: frozenset[str] = frozenset()
    ) -> list[Hit]:
        """The top ``k`` passages for one query (see :meth:`search_many`)."""
        return self.search_many([query], k=k, mode=mode, exclude=[exclude])[0]

    def _hits(self, lex: Ranking, den: Ranking, exclude: frozenset[str], k: int, mode: Mode) -> list[Hit]:
        kept = [
            [(r, s) for r, s in ranking if not exclude or self.passages[r].hash not in exclude]
            for ranking in (lex, den)
        ]
        found = [{row: (i, s) for i, (row, s) in enumerate(ranking, start=1)} for ranking in kept]
        rows = [[r for r, _ in ranking] for ranking in kept]
        rankings = {"bm25": rows[:1], "dense": rows[1:], "hybrid": rows}[mode]
        return [
            Hit(self.passages[row], rank, score, found[0].get(row), found[1].get(row))
            for rank, (row, score) in enumerate(rrf(rankings, top=k), start=1)
        ]
