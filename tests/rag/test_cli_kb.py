"""`fedtune kb build` / `fedtune kb search`: output, the manifest, --add, and bad input (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedtune import cli_kb
from fedtune.rag.embed import packaged_minilm
from fedtune.rag.store import MODES, KnowledgeBase
from helpers import run_cli

DOCS = {
    "volcano.md": "Mount Etna in Sicily is the most active volcano in Europe.",  # 11 words
    "bees.md": "Honey bees collect nectar from flowers and make honey in the hive.",  # 12 words
    "rivers/nile.txt": "The Nile is the longest river in Africa.",  # 8 words
    "rivers/amazon.txt": "The Amazon river flows through the rainforest of South America.",  # 10 words
    "copy.md": "the nile is the LONGEST river in  Africa.",  # nile.txt folded; read first (sorted paths)
}
# --chunk-size 8 --overlap 2: windows start every 6 words while start < words - 2, so 11, 12
# and 10 words give 2 windows each, 8 words 1; nile.txt is skipped as a duplicate of copy.md
IDS = ["bees.md#0", "bees.md#1", "copy.md", "rivers/amazon.txt#0", "rivers/amazon.txt#1"]
IDS += ["volcano.md#0", "volcano.md#1"]
CHUNKING = ["--chunk-size", "8", "--overlap", "2"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``run_cli`` with all whitespace taken out of stderr: rich wraps a long path anywhere."""
    code, out, err = run_cli(capsys, *args)
    return code, out, "".join(err.split())


def _in(message: str, err: str) -> bool:
    return "".join(message.split()) in err


def _folder(root: Path, docs: dict[str, str]) -> Path:
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DOCS built by the command's function (the command line itself is tested below)."""
    root = tmp_path_factory.mktemp("cli")
    cli_kb.build(str(_folder(root / "docs", DOCS)), root / "base", chunk_size=8, overlap=2, progress=False)
    return root / "base"


@pytest.fixture
def base_copy(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "base"))


def _search(capsys, base: Path, query: str, *args: str) -> list[dict]:
    code, out, err = cli(capsys, "kb", "search", str(base), query, "--json", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _nothing_beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_build_prints_counts_and_records_source_and_chunking(capsys, tmp_path: Path) -> None:
    docs = _folder(tmp_path / "docs", DOCS)

    code, out, err = cli(capsys, "kb", "build", str(docs), str(tmp_path / "kb"), *CHUNKING, "--no-progress")

    assert code == 0, err
    assert out.startswith(f"indexed 7 passages into {tmp_path / 'kb'} in ")
    assert out.endswith(" s (duplicates skipped: 1; passages in the base: 7)\n")
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert [p.id for p in kb.passages] == IDS
    assert kb.manifest["sources"] == [
        {
            "source": str(docs),
            "text_field": "text",
            "id_field": None,
            "split": "train",
            "chunk_size": 8,
            "overlap": 2,
            "max_chars": 20000,
        }
    ]


def test_build_from_records_with_text_and_id_fields(capsys, tmp_path: Path) -> None:
    rows = [{"key": "k1", "body": "Owls hunt at night."}, {"key": "k2", "body": "Bats hunt at night too."}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    code, _, err = cli(
        capsys, "kb", "build", str(tmp_path / "r.jsonl"), str(tmp_path / "kb"), "--text-field", "body",
        "--id-field", "key", "--no-progress",
    )  # fmt: skip

    assert code == 0, err
    assert [(p.id, p.source) for p in KnowledgeBase.open(tmp_path / "kb").passages] == [
        ("k1", f"{tmp_path / 'r.jsonl'}:1"),
        ("k2", f"{tmp_path / 'r.jsonl'}:2"),
    ]


def test_search_json_lines_carry_rank_id_source_and_scores(capsys, base: Path) -> None:
    rows = _search(capsys, base, "longest river in Africa", "-k", "3")

    assert [r["rank"] for r in rows] == [1, 2, 3]
    top = rows[0]
    assert set(top) == {"rank", "id", "source", "score", "bm25", "dense", "text"}
    assert (top["id"], top["source"], top["bm25"]["rank"], top["dense"]["rank"]) == ("copy.md",) * 2 + (1, 1)
    assert top["score"] == pytest.approx(2 / 61)  # first in both rankings: 1/(60+1) twice
    assert top["text"] == "the nile is the LONGEST river in Africa."


def test_search_modes_report_only_their_retriever(capsys, base: Path) -> None:
    lexical = _search(capsys, base, "volcano", "--mode", "bm25", "-k", "5")
    dense = _search(capsys, base, "volcano", "--mode", "dense", "-k", "2")

    assert [(r["id"], r["dense"]) for r in lexical] == [("volcano.md#1", None)]  # the only "volcano"
    assert lexical[0]["bm25"]["rank"] == 1
    assert len(dense) == 2 and all(r["bm25"] is None and r["dense"] for r in dense)
    assert [r["dense"]["rank"] for r in dense] == [1, 2]


def test_search_prints_ranked_passages(capsys, base: Path) -> None:
    code, out, _ = cli(capsys, "kb", "search", str(base), "honey bees", "-k", "2")

    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("1. bees.md#0  bees.md  rrf 0.0328  bm25 #1 ")
    assert "dense #1 " in lines[0]
    assert lines[1].strip() == "Honey bees collect nectar from flowers and make"  # 8 words
    assert lines[2].startswith("2. ")


def test_bm25_search_with_no_shared_word_says_so(capsys, base: Path) -> None:
    code, out, _ = cli(capsys, "kb", "search", str(base), "zebra", "--mode", "bm25")

    assert code == 0
    assert out == f"no passage of {base} shares a word with the query (try --mode dense)\n"
    assert _search(capsys, base, "zebra", "--mode", "bm25") == []


def test_add_keeps_the_base_and_appends_new_passages(
    capsys, base: Path, base_copy: Path, tmp_path: Path
) -> None:
    more = _folder(tmp_path / "more", {"owls.md": "Owls hunt at night.", "again.md": DOCS["rivers/nile.txt"]})

    code, out, err = cli(capsys, "kb", "build", str(more), str(base_copy), "--add", "--no-progress")

    assert code == 0, err
    assert out.startswith(f"added 1 passages into {base_copy} in ")
    assert out.endswith(" s (duplicates skipped: 1; passages in the base: 8)\n")
    kb = KnowledgeBase.open(base_copy)
    assert [p.id for p in kb.passages] == [*IDS, "owls.md"]
    assert kb.manifest["sources"][0] == KnowledgeBase.open(base).manifest["sources"][0]
    assert kb.manifest["sources"][1]["source"] == str(more)
    assert [s["chunk_size"] for s in kb.manifest["sources"]] == [8, 200]
    assert [r["id"] for r in _search(capsys, base_copy, "owls", "--mode", "bm25")] == ["owls.md"]


def test_modes_of_the_command_are_the_stores() -> None:
    assert cli_kb.MODE_CHOICES == MODES


def _set_probe(folder: Path) -> None:
    # as if built by another model: the recorded probe vector points elsewhere
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["embedder"]["probe"] = manifest["embedder"]["probe"][::-1]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_embedder_is_checked_by_its_vectors_not_its_name(capsys, tmp_path: Path) -> None:
    docs = _folder(tmp_path / "docs", {"a.md": "Owls hunt at night.", "b.md": "Bread is baked."})
    folder = str(packaged_minilm())
    code, _, err = cli(
        capsys, "kb", "build", str(docs), str(tmp_path / "kb"), "--embedder", folder, "--no-progress"
    )
    assert code == 0, err

    # the same model by its name: accepted
    assert _search(capsys, tmp_path / "kb", "owls", "--embedder", "all-MiniLM-L6-v2")[0]["id"] == "a.md"
    _set_probe(tmp_path / "kb")
    code, _, err = cli(capsys, "kb", "search", str(tmp_path / "kb"), "owls")

    assert code == 2
    assert _in(f"{tmp_path / 'kb'}: built with embedder '{folder}'", err)
    assert _in("makes other vectors", err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "Invalid value for '-k' / '--k': 0 is not in the range x>=1"),
        (["-k", "-3"], "Invalid value for '-k' / '--k': -3 is not in the range x>=1"),
        (["--mode", "fuzzy"], "Invalid value for '--mode': 'fuzzy' is not one of 'bm25', 'dense', 'hybrid'"),
    ],
)
def test_bad_search_options_exit_2(capsys, base: Path, args: list[str], message: str) -> None:
    code, out, err = cli(capsys, "kb", "search", str(base), "river", *args)

    assert (code, out) == (2, "")
    assert _in(message, err)


def test_empty_query_is_refused(capsys, base: Path) -> None:
    code, _, err = cli(capsys, "kb", "search", str(base), "  ")

    assert code == 2
    assert _in("error: the query is empty", err)


def test_query_before_build_names_the_folder(capsys, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "kb", "search", str(tmp_path / "nokb"), "river")

    assert code == 2
    assert _in(f"error: {tmp_path / 'nokb'}: no knowledge base here (build one: fedtune kb build SOURCE", err)
    assert not (tmp_path / "nokb").exists()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "manifest.json").write_text("{"), "manifest.json: corrupt manifest"),
        (lambda f: (f / "dense.faiss").write_bytes(b"junk"), "dense.faiss: corrupt dense index"),
        (lambda f: shutil.rmtree(f / "bm25"), "bm25: missing; the knowledge base is incomplete"),
        (_set_probe, "built with embedder 'all-MiniLM-L6-v2'"),
    ],
)
def test_broken_base_is_named(capsys, base_copy: Path, breakage, message: str) -> None:
    breakage(base_copy)

    code, _, err = cli(capsys, "kb", "search", str(base_copy), "river", "--mode", "dense")

    assert code == 2
    assert _in(f"error: {base_copy}", err) and _in(message, err)


def _failed_build(capsys, tmp_path: Path, docs: dict[str, str], *args: str) -> str:
    source = _folder(tmp_path / "docs", docs)
    code, out, err = cli(capsys, "kb", "build", str(source), str(tmp_path / "kb"), "--no-progress", *args)
    assert (code, out) == (2, "")
    assert _nothing_beside(tmp_path) == ["docs"], "a half-written base or a temporary folder was left"
    return err


def test_empty_source_is_refused(capsys, tmp_path: Path) -> None:
    err = _failed_build(capsys, tmp_path, {"blank.md": " \n\n ", "empty.txt": ""})

    assert _in(f"error: {tmp_path / 'kb'}: nothing to index (the source has no non-blank text)", err)


def test_passage_too_long_is_refused(capsys, tmp_path: Path) -> None:
    err = _failed_build(
        capsys, tmp_path, {"a.md": "short", "long.md": "x" * 30}, "--chunk-size", "0", "--max-chars", "20"
    )

    assert _in("error: long.md: a passage of 30 characters exceeds the limit of 20", err)


def test_overlap_not_below_chunk_size_is_refused(capsys, tmp_path: Path) -> None:
    err = _failed_build(capsys, tmp_path, {"a.md": "one two three"}, "--chunk-size", "4", "--overlap", "4")

    assert _in("chunk size 4 and overlap 4: need size ≥ 0 and 0 ≤ overlap < size", err)


def test_missing_source_and_missing_text_field(capsys, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "kb", "build", str(tmp_path / "no.jsonl"), str(tmp_path / "kb"))
    assert code == 2 and _in(f"{tmp_path / 'no.jsonl'}: no such file", err)

    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    code, _, err = cli(capsys, "kb", "build", str(tmp_path / "r.jsonl"), str(tmp_path / "kb"))
    assert code == 2 and _in(
        "r.jsonl:1: no text field 'text' (the record's keys: body); set --text-field", err
    )
    assert _nothing_beside(tmp_path) == ["r.jsonl"]


def test_build_never_replaces_a_folder_that_is_not_a_base(capsys, tmp_path: Path) -> None:
    docs = _folder(tmp_path / "docs", {"a.md": "alpha"})

    code, _, err = cli(capsys, "kb", "build", str(docs), str(docs), "--no-progress")

    assert code == 2
    assert _in(f"error: {docs}: exists and is not a knowledge base; not replacing it", err)
    assert (docs / "a.md").read_text() == "alpha"


def test_add_to_a_missing_base_is_refused(capsys, tmp_path: Path) -> None:
    docs = _folder(tmp_path / "docs", {"a.md": "alpha"})

    code, _, err = cli(capsys, "kb", "build", str(docs), str(tmp_path / "kb"), "--add")

    assert code == 2
    assert _in(f"error: {tmp_path / 'kb'}: no knowledge base here", err)
    assert _nothing_beside(tmp_path) == ["docs"]


def test_add_with_another_embedder_leaves_the_base(capsys, base_copy: Path, tmp_path: Path) -> None:
    _set_probe(base_copy)
    before = {p.name: p.read_bytes() for p in base_copy.iterdir() if p.is_file()}
    docs = _folder(tmp_path / "docs", {"owls.md": "Owls hunt at night."})

    code, _, err = cli(capsys, "kb", "build", str(docs), str(base_copy), "--add", "--no-progress")

    assert code == 2 and _in("makes other vectors", err)
    assert {p.name: p.read_bytes() for p in base_copy.iterdir() if p.is_file()} == before
    assert _nothing_beside(tmp_path) == ["base", "docs"]
