"""The knowledge-base folder: dedup, search modes, fusion, exclusion, incremental add, bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedtune.errors import FedtuneError
from fedtune.rag import store
from fedtune.rag.fusion import rrf
from fedtune.rag.sources import Passage
from fedtune.rag.store import KnowledgeBase, add, build
from rag.corpus import CORPUS, DUPLICATES, INFO, TEXTS


def _ids(hits: list[store.Hit]) -> list[str]:
    return [h.passage.id for h in hits]


def _no_temp_beside(folder: Path) -> None:
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_build_keeps_each_text_once_in_input_order(built_kb: Path) -> None:
    kb = KnowledgeBase.open(built_kb)

    # 16 passages in, a verbatim and a case/space-folded duplicate out
    assert len(kb) == len(CORPUS) == 14
    assert [p.id for p in kb.passages] == [p.id for p in CORPUS]
    rows = (built_kb / "passages.jsonl").read_text().splitlines()
    assert [json.loads(r)["text"] for r in rows] == TEXTS


def test_manifest_records_embedder_count_and_info(built_kb: Path) -> None:
    manifest = json.loads((built_kb / "manifest.json").read_text())

    assert (manifest["format"], manifest["version"], manifest["count"]) == ("fedtune-kb", 1, 14)
    assert manifest["embedder"]["name"] == "all-MiniLM-L6-v2"
    assert manifest["embedder"]["dim"] == len(manifest["embedder"]["probe"]) == 384
    assert manifest["sources"] == INFO["sources"]
    assert manifest["lexical"] == {"stopwords": "en", "stemmer": "english"}


def test_a_base_built_before_stemming_is_searched_as_built(kb_copy: Path) -> None:
    # as fedtune wrote bases before the manifest had "lexical": bm25 tokens unstemmed
    kb = KnowledgeBase.open(kb_copy)
    old = {k: v for k, v in kb.manifest.items() if k not in ("lexical", "count")}
    store._write(kb_copy, old, kb.passages, kb.dense_vectors())

    reopened = KnowledgeBase.open(kb_copy)
    assert _ids(reopened.search("volcano", k=14, mode="bm25")) == ["p1"]
    assert _ids(reopened.search("rivers", k=14, mode="bm25")) == ["p13"]


def test_an_unknown_stemmer_in_the_manifest_is_named(kb_copy: Path) -> None:
    manifest = json.loads((kb_copy / "manifest.json").read_text())
    manifest["lexical"]["stemmer"] = "klingon"
    (kb_copy / "manifest.json").write_text(json.dumps(manifest))

    for opening in (lambda: KnowledgeBase.open(kb_copy), lambda: add(kb_copy, CORPUS[:1])):
        with pytest.raises(FedtuneError, match=r"manifest.json: unknown lexical stemmer 'klingon'"):
            opening()  # refused at open, like the manifest's other keys: before anything is written


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("volcano", {"p0", "p1"}),  # "Volcanoes" (p0) stems to "volcano"
        ("river", {"p6", "p7", "p13"}),  # as "rivers" (p13) to "river"
        ("erupting", {"p0"}),  # and "erupting" to "erupt"
        ("honey bees", {"p2", "p3"}),
        ("the of and", set()),  # stop words only
        ("zebra", set()),
    ],
)
def test_bm25_returns_exactly_the_passages_sharing_a_term(
    built_kb: Path, query: str, expected: set[str]
) -> None:
    hits = KnowledgeBase.open(built_kb).search(query, k=14, mode="bm25")

    assert set(_ids(hits)) == expected
    assert all(h.dense is None and h.bm25 is not None and h.bm25[1] > 0 for h in hits)


def test_dense_finds_paraphrases_without_shared_words(built_kb: Path) -> None:
    kb = KnowledgeBase.open(built_kb)

    assert _ids(kb.search("molten rock erupting from a mountain", k=2, mode="dense"))[0] in {"p0", "p1"}
    assert _ids(kb.search("an instrument with keys", k=1, mode="dense")) == ["p9"]
    hits = kb.search("zebra", k=14, mode="dense")
    assert len(hits) == 14  # dense ranks every passage
    cosines = [h.dense[1] for h in hits if h.dense]
    assert cosines == sorted(cosines, reverse=True)


@pytest.mark.parametrize("query", ["longest river in Africa", "honey bees make honey", "programming memory"])
def test_hybrid_is_rrf_of_the_two_single_mode_rankings(built_kb: Path, query: str) -> None:
    kb = KnowledgeBase.open(built_kb)
    lexical = kb.search(query, k=14, mode="bm25")
    dense = kb.search(query, k=14, mode="dense")

    hybrid = kb.search(query, k=5, mode="hybrid")

    expected = rrf([_ids(lexical), _ids(dense)], top=5)
    assert [(h.passage.id, h.score) for h in hybrid] == [(i, pytest.approx(s)) for i, s in expected]
    assert [h.rank for h in hybrid] == [1, 2, 3, 4, 5]
    by_id = {h.passage.id: h for h in [*lexical, *dense]}
    for h in hybrid:  # each retriever's (rank, score) as in its own mode
        assert h.bm25 == next((x.bm25 for x in lexical if x.passage.id == h.passage.id), None)
        assert h.dense == next(x.dense for x in dense if x.passage.id == h.passage.id)
        assert h.passage == by_id[h.passage.id].passage


def test_first_in_both_rankings_scores_two_over_sixty_one(built_kb: Path) -> None:
    top = KnowledgeBase.open(built_kb).search("Nile longest river Africa", k=1)[0]

    assert (top.passage.id, top.bm25 and top.bm25[0], top.dense and top.dense[0]) == ("p7", 1, 1)
    assert top.score == pytest.approx(2 / 61)


def test_excluded_hashes_are_never_returned(built_kb: Path) -> None:
    kb = KnowledgeBase.open(built_kb)
    nile = kb.passages[7]

    for mode in store.MODES:
        hits = kb.search("Nile longest river Africa", k=14, mode=mode, exclude=frozenset({nile.hash}))
        assert "p7" not in _ids(hits)
    lexical = kb.search("river", k=5, mode="bm25", exclude=frozenset({nile.hash}))
    assert sorted(h.passage.id for h in lexical) == ["p13", "p6"]
    assert [h.rank for h in lexical] == [1, 2]


def test_search_many_matches_single_searches(built_kb: Path) -> None:
    kb = KnowledgeBase.open(built_kb)
    queries = ["violin strings", "bread flour"]
    excl = [frozenset(), frozenset({kb.passages[12].hash})]

    many = kb.search_many(queries, k=3, exclude=excl)

    assert [_ids(h) for h in many] == [
        _ids(kb.search(q, k=3, exclude=e)) for q, e in zip(queries, excl, strict=True)
    ]
    assert "p12" not in _ids(many[1])


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"mode": "fuzzy"}, "retrieval mode 'fuzzy'"), ({"k": 0}, "k must")]
)
def test_bad_search_arguments(built_kb: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(FedtuneError, match=message):
        KnowledgeBase.open(built_kb).search("river", **kwargs)


def test_add_keeps_old_rows_and_vectors_and_skips_duplicates(kb_copy: Path) -> None:
    old = KnowledgeBase.open(kb_copy)
    old_vectors = old.dense_vectors()
    new = [
        Passage("n0", "new.md", "Penguins cannot fly but swim very well."),
        Passage("n1", "new.md", TEXTS[3].upper()),  # already in the base
        Passage("n2", "new.md", "Penguins cannot fly but swim very well."),  # twice in the input
        Passage("n3", "new.md", "Saturn has bright rings of ice."),
    ]

    kb, added = add(kb_copy, new, info={"note": "second source"})

    assert added == 2
    assert [p.id for p in kb.passages] == [*[p.id for p in CORPUS], "n0", "n3"]
    np.testing.assert_array_equal(kb.dense_vectors()[:14], old_vectors)
    assert _ids(kb.search("penguins", k=3, mode="bm25")) == ["n0"]
    assert _ids(kb.search("planet with rings", k=1, mode="dense")) == ["n3"]
    assert (kb.manifest["count"], kb.manifest["note"], kb.manifest["sources"]) == (
        16,
        "second source",
        INFO["sources"],
    )
    _no_temp_beside(kb_copy)


def test_add_of_only_duplicates_writes_nothing(kb_copy: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in kb_copy.iterdir()}

    kb, added = add(kb_copy, [DUPLICATES[1]])

    assert (added, len(kb)) == (0, 14)
    assert {p.name: p.stat().st_mtime_ns for p in kb_copy.iterdir()} == before


def test_failing_build_leaves_no_folder_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store.faiss, "write_index", disk_full)  # after passages.jsonl is written
    with pytest.raises(OSError, match="disk full"):
        build(CORPUS[:2], tmp_path / "kb")

    assert list(tmp_path.iterdir()) == []


def test_failing_add_leaves_the_old_base(kb_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (kb_copy / "passages.jsonl").read_text()
    monkeypatch.setattr(store.faiss, "write_index", lambda *_: (_ for _ in ()).throw(OSError("disk full")))

    with pytest.raises(OSError):
        add(kb_copy, [Passage("n", "n.md", "Owls hunt at night.")])

    assert (kb_copy / "passages.jsonl").read_text() == before
    assert len(KnowledgeBase.open(kb_copy)) == 14
    _no_temp_beside(kb_copy)


def test_empty_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match="nothing to index"):
        build([Passage("a", "a.md", "x")][:0], tmp_path / "kb")
    assert list(tmp_path.iterdir()) == []


def test_build_never_replaces_a_folder_that_is_not_a_base(tmp_path: Path) -> None:
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")

    with pytest.raises(FedtuneError, match=r"notes: exists and is not a knowledge base"):
        build(CORPUS[:2], precious)
    assert (precious / "keep.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(build(CORPUS[:2], empty)) == 2


def test_rebuild_replaces_a_base(kb_copy: Path) -> None:
    kb = build(CORPUS[:3], kb_copy)

    assert len(kb) == len(KnowledgeBase.open(kb_copy)) == 3
    _no_temp_beside(kb_copy)


def _set_probe(folder: Path, change) -> None:
    file = folder / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["embedder"]["probe"] = change(manifest["embedder"]["probe"])
    file.write_text(json.dumps(manifest))


def test_another_embedder_is_refused_for_dense_search_and_add(kb_copy: Path) -> None:
    # as if built by another model: the probe vector points elsewhere (a cyclic shift)
    _set_probe(kb_copy, lambda v: v[1:] + v[:1])
    kb = KnowledgeBase.open(kb_copy)

    assert _ids(kb.search("Etna", mode="bm25")) == ["p1"]  # bm25 needs no embedder
    for mode in ("dense", "hybrid"):
        with pytest.raises(
            FedtuneError, match=r"base: built with embedder 'all-MiniLM-L6-v2'; the query embedder"
        ):
            kb.search("volcano", mode=mode)
    with pytest.raises(FedtuneError, match="makes other vectors"):
        add(kb_copy, [Passage("n", "n.md", "Owls hunt at night.")])
    assert len(KnowledgeBase.open(kb_copy)) == 14


def test_probe_of_another_dimension_is_another_embedder(kb_copy: Path) -> None:
    _set_probe(kb_copy, lambda v: v[:100])

    with pytest.raises(FedtuneError, match="makes other vectors"):
        KnowledgeBase.open(kb_copy).search("volcano", mode="dense")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "manifest.json").write_text("{not json"), r"manifest\.json: corrupt manifest"),
        (
            lambda f: (f / "manifest.json").write_text('{"format": "other"}'),
            "not a fedtune knowledge-base manifest",
        ),
        (lambda f: (f / "manifest.json").unlink(), r"base: not a knowledge base \(no manifest\.json"),
        (lambda f: (f / "passages.jsonl").unlink(), r"passages\.jsonl: missing"),
        (lambda f: (f / "passages.jsonl").write_text('{"id": "x"}\n'), r"passages\.jsonl:1: corrupt passage"),
        (
            lambda f: (f / "passages.jsonl").write_text(
                "".join((f / "passages.jsonl").read_text().splitlines(keepends=True)[:3])
            ),
            "3 passages but the manifest says 14",
        ),
        (lambda f: (f / "dense.faiss").unlink(), r"dense\.faiss: missing"),
        (lambda f: [p.unlink() for p in (f / "bm25").iterdir()] and (f / "bm25").rmdir(), r"bm25: missing"),
    ],
)
def test_broken_folder_is_refused_at_open(kb_copy: Path, breakage, message: str) -> None:
    breakage(kb_copy)

    with pytest.raises(FedtuneError, match=message):
        KnowledgeBase.open(kb_copy)


def test_version_mismatch_names_both_versions(kb_copy: Path) -> None:
    manifest = json.loads((kb_copy / "manifest.json").read_text())
    (kb_copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))

    with pytest.raises(FedtuneError, match="knowledge-base version 99; this fedtune reads 1"):
        KnowledgeBase.open(kb_copy)


def test_corrupt_indexes_are_refused_at_first_search(kb_copy: Path, built_kb: Path) -> None:
    (kb_copy / "dense.faiss").write_bytes(b"garbage")
    (kb_copy / "bm25" / "params.index.json").write_text("{garbage")
    kb = KnowledgeBase.open(kb_copy)

    with pytest.raises(FedtuneError, match=r"dense\.faiss: corrupt dense index"):
        kb.search("river", mode="dense")
    with pytest.raises(FedtuneError, match=r"bm25: corrupt bm25 index"):
        kb.search("river", mode="bm25")


def test_dense_index_of_another_size_is_refused(kb_copy: Path, tmp_path: Path) -> None:
    build(CORPUS[:2], tmp_path / "small")
    (kb_copy / "dense.faiss").write_bytes((tmp_path / "small" / "dense.faiss").read_bytes())

    with pytest.raises(FedtuneError, match=r"dense\.faiss: 2 vectors for 14 passages"):
        KnowledgeBase.open(kb_copy).search("river", mode="dense")


def test_query_before_build_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match=r"nokb: no knowledge base here \(build one: fedtune kb build"):
        KnowledgeBase.open(tmp_path / "nokb")
