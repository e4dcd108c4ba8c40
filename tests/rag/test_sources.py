"""Documents from folders and record files; chunking into word windows; passage hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.rag.sources import Doc, Passage, chunk_words, read_docs, text_hash, to_passages

TEN = " ".join(f"w{i}" for i in range(10))


def _words(window: str) -> list[int]:
    return [int(w[1:]) for w in window.split()]


def test_windows_share_overlap_words() -> None:
    # size 4, overlap 1: step 3, windows start at 0, 3, 6; the last one ends at w9
    assert [_words(c) for c in chunk_words(TEN, 4, 1)] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    # size 4, overlap 2: step 2, starts 0, 2, 4, 6
    assert [_words(c) for c in chunk_words(TEN, 4, 2)] == [
        [0, 1, 2, 3],
        [2, 3, 4, 5],
        [4, 5, 6, 7],
        [6, 7, 8, 9],
    ]


def test_last_window_may_be_short_but_no_window_is_only_overlap() -> None:
    eleven = f"{TEN} w10"
    # step 3 from 0 while start < 11 - 1: 0, 3, 6, 9 -> the last window is w9 w10
    assert [_words(c) for c in chunk_words(eleven, 4, 1)] == [
        [0, 1, 2, 3],
        [3, 4, 5, 6],
        [6, 7, 8, 9],
        [9, 10],
    ]
    # 7 words, size 4, overlap 3: starts 0..3; no window of only w4..w6 repeated
    assert chunk_words("a b c d e f g", 4, 3) == ["a b c d", "b c d e", "c d e f", "d e f g"]


def test_short_text_whole_size_zero_whole_blank_empty() -> None:
    assert chunk_words("  one\n two\tthree ", 5, 2) == ["one two three"]
    assert chunk_words(TEN, 0, 0) == [TEN]
    assert chunk_words(" \n\t ", 4, 1) == []


@pytest.mark.parametrize(("size", "overlap"), [(4, 4), (4, 9), (-1, 0), (4, -1)])
def test_bad_chunking_is_refused(size: int, overlap: int) -> None:
    with pytest.raises(FedtuneError, match=f"chunk size {size} and overlap {overlap}"):
        chunk_words(TEN, size, overlap)


def test_passages_number_chunks_and_skip_blank_documents() -> None:
    docs = [Doc("a", "a.md", TEN), Doc("b", "b.md", "  "), Doc("c", "c.md", "short one")]

    passages = list(to_passages(docs, chunk_size=4, overlap=1))

    assert [p.id for p in passages] == ["a#0", "a#1", "a#2", "c"]
    assert {p.source for p in passages} == {"a.md", "c.md"}
    assert passages[1].text == "w3 w4 w5 w6"


def test_passage_too_long_names_its_source() -> None:
    docs = [Doc("ok", "ok.md", "fine"), Doc("big", "notes/big.md", "x" * 50)]

    with pytest.raises(
        FedtuneError, match=r"notes/big\.md: a passage of 50 characters exceeds the limit of 49"
    ):
        list(to_passages(docs, chunk_size=0, max_chars=49))
    assert len(list(to_passages(docs, chunk_size=0, max_chars=50))) == 2


def test_hash_folds_case_and_whitespace_only() -> None:
    assert text_hash("The  Nile\nflows.") == text_hash("the nile flows.")
    assert text_hash("The Nile flows.") != text_hash("The Nile flows!")
    assert Passage("x", "s", "A b").hash == text_hash("a B")


def test_folder_reads_text_and_markdown_with_relative_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# A\nalpha")
    (tmp_path / "sub" / "b.txt").write_text("beta")
    (tmp_path / "c.py").write_text("print('not a document')")

    docs = list(read_docs(str(tmp_path)))

    assert [(d.id, d.source, d.text) for d in docs] == [
        ("a.md", "a.md", "# A\nalpha"),
        ("sub/b.txt", "sub/b.txt", "beta"),
    ]


def test_folder_without_documents_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.py").write_text("x = 1")

    with pytest.raises(FedtuneError, match=r"no \.txt/\.md/\.markdown files"):
        list(read_docs(str(tmp_path)))


def test_records_take_text_and_id_fields(tmp_path: Path) -> None:
    file = tmp_path / "r.jsonl"
    file.write_text(json.dumps({"key": 7, "body": "seven"}) + "\n" + json.dumps({"body": "no key"}) + "\n")

    docs = list(read_docs(str(file), text_field="body", id_field="key"))

    assert [(d.id, d.text) for d in docs] == [("7", "seven"), (f"{file}:2", "no key")]
    assert docs[0].source == f"{file}:1"


def test_csv_records(tmp_path: Path) -> None:
    file = tmp_path / "r.csv"
    file.write_text("text,topic\nfirst row,a\nsecond row,b\n")

    assert [d.text for d in read_docs(str(file))] == ["first row", "second row"]


def test_missing_text_field_names_record_and_keys(tmp_path: Path) -> None:
    file = tmp_path / "r.jsonl"
    file.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "b", "id": 1}) + "\n")

    with pytest.raises(
        FedtuneError, match=r"r\.jsonl:2: no text field 'text' \(the record's keys: body, id\)"
    ):
        list(read_docs(str(file)))


def test_non_string_text_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "r.jsonl"
    file.write_text(json.dumps({"text": ["a", "list"]}) + "\n")

    with pytest.raises(FedtuneError, match=r"r\.jsonl:1: field 'text' must be a string, not list"):
        list(read_docs(str(file)))


def test_missing_file_and_unknown_wiki_category(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match="no such file"):
        read_docs(str(tmp_path / "absent.jsonl"))
    with pytest.raises(FedtuneError, match=r"wiki: no category Nowhere; the categories: .*Geography"):
        list(read_docs("wiki:Nowhere"))
