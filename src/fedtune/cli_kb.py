"""``fedtune kb``: build and search knowledge bases, the index folders FF-RAG retrieves from.

The library is :mod:`fedtune.rag` (sources, store); this module only parses arguments,
times and prints. A bad input raises :class:`~fedtune.errors.FedtuneError`, which the
``fedtune`` entry point prints as one line and turns into exit status 2.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import click
import typer
from rich.console import Console
from rich.markup import escape

from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.rag.sources import Passage
    from fedtune.rag.store import Hit, Mode

kb_app = typer.Typer(
    no_args_is_help=True, help="Knowledge bases for retrieval: build, search, ask (federated)."
)
stdout = Console(soft_wrap=True)  # lines as written: paths and passages stay whole for grep

# fedtune.rag.store.MODES (a test checks they agree): importing the store takes seconds
MODE_CHOICES = ("bm25", "dense", "hybrid")

BaseArg = Annotated[Path, typer.Argument(metavar="OUT", help="a knowledge-base folder")]
EmbedderOpt = Annotated[
    str | None,
    typer.Option(
        help="sentence-transformers model name or folder (default: the base's own; "
        "a new base: all-MiniLM-L6-v2, packaged, offline)"
    ),
]


@dataclass(frozen=True)
class SourceSpec:
    """What a base was built from and how it was chunked: one entry of its manifest's ``sources``."""

    source: str
    text_field: str
    id_field: str | None
    split: str
    chunk_size: int
    overlap: int
    max_chars: int

    def passages(self) -> list[Passage]:
        """The source's passages, read and chunked (nothing is written)."""
        from fedtune.rag.sources import read_docs, to_passages

        docs = read_docs(self.source, text_field=self.text_field, id_field=self.id_field, split=self.split)
        chunks = to_passages(docs, chunk_size=self.chunk_size, overlap=self.overlap, max_chars=self.max_chars)
        return list(chunks)


@kb_app.command("build")
def build(
    source: Annotated[
        str,
        typer.Argument(
            help="wiki, wiki:CATEGORY[,CATEGORY], a text/Markdown folder, a JSONL/JSON/CSV/Parquet "
            "file of records, or a datasets name"
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="the knowledge-base folder to write")],
    text_field: Annotated[str, typer.Option(help="records: the field holding the text")] = "text",
    id_field: Annotated[
        str | None, typer.Option(help="records: the field holding an id (default: file:line)")
    ] = None,
    split: Annotated[str, typer.Option(help="datasets: the split to read")] = "train",
    chunk_size: Annotated[int, typer.Option(min=0, help="words per passage; 0 keeps documents whole")] = 200,
    overlap: Annotated[int, typer.Option(min=0, help="words a passage shares with the one before")] = 40,
    max_chars: Annotated[int, typer.Option(min=1, help="refuse a longer passage")] = 20_000,
    embedder: EmbedderOpt = None,
    add: Annotated[bool, typer.Option("--add", help="add to the existing base OUT, not rebuild it")] = False,
    progress: Annotated[bool, typer.Option(help="show the embedding progress bar")] = True,
) -> None:
    """Index SOURCE's passages (deduplicated) into the folder OUT: bm25 + dense, written atomically.

    Without --add an existing base at OUT is rebuilt; a folder at OUT that is not a knowledge
    base is never replaced. The source and its chunking are recorded in OUT/manifest.json.
    """
    from fedtune.rag import store
    from fedtune.rag.embed import DEFAULT_EMBEDDER

    started = time.perf_counter()
    spec = SourceSpec(source, text_field, id_field, split, chunk_size, overlap, max_chars)
    if not add:
        passages = spec.passages()
        info = {"sources": [asdict(spec)]}
        kb = store.build(passages, out, embedder=embedder or DEFAULT_EMBEDDER, progress=progress, info=info)
        added = len(kb)
    else:
        old = store.KnowledgeBase.open(out, embedder=embedder)
        old.embedder()  # a missing base or another embedder fails before the source is read
        passages = spec.passages()
        if not passages:
            raise FedtuneError(f"{source}: nothing to add (the source has no non-blank text)")
        info = {"sources": [*old.manifest.get("sources", []), asdict(spec)]}
        kb, added = store.add(out, passages, embedder=embedder, progress=progress, info=info)
    seconds = time.perf_counter() - started
    stdout.print(
        f"{'added' if add else 'indexed'} {added} passages into {escape(str(out))} in {seconds:.1f} s "
        f"(duplicates skipped: {len(passages) - added}; passages in the base: {len(kb)})"
    )


def _retriever(score: tuple[int, float] | None) -> dict[str, float] | None:
    return None if score is None else {"rank": score[0], "score": score[1]}


def hit_record(hit: Hit) -> dict[str, Any]:
    """One search result as a JSON-ready dict (a line of ``fedtune kb search --json``).

    Keys: ``rank``, ``id``, ``source``, ``score`` (the RRF score), ``bm25`` and ``dense``
    (``{"rank", "score"}`` in that retriever, or null where it did not find the passage or
    was not asked), ``text``.
    """
    return {
        "rank": hit.rank,
        "id": hit.passage.id,
        "source": hit.passage.source,
        "score": hit.score,
        "bm25": _retriever(hit.bm25),
        "dense": _retriever(hit.dense),
        "text": hit.passage.text,
    }


def _print_hit(hit: Hit) -> None:
    parts = [f"rrf {hit.score:.4f}"]
    for name, found in (("bm25", hit.bm25), ("dense", hit.dense)):
        if found is not None:
            parts.append(f"{name} #{found[0]} {found[1]:.4f}")
    p, scores = hit.passage, "  ".join(parts)
    stdout.print(f"[bold]{hit.rank}.[/bold] {escape(p.id)}  [dim]{escape(p.source)}[/dim]  {scores}")
    stdout.print(f"   {escape(p.text)}", highlight=False)


@kb_app.command("search")
def search(
    out: BaseArg,
    query: Annotated[str, typer.Argument(help="the query text")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="passages to return")] = 5,
    mode: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(MODE_CHOICES),
            help="bm25 (lexical), dense (embeddings) or hybrid (RRF of both)",
        ),
    ] = "hybrid",
    json_: Annotated[bool, typer.Option("--json", help="one JSON object per line, for scripts")] = False,
    embedder: EmbedderOpt = None,
) -> None:
    """The top K passages of the base OUT for QUERY.

    Each with its rank, id, source, RRF score and its (rank, score) in each retriever.
    """
    from fedtune.rag.store import KnowledgeBase

    if not query.strip():
        raise FedtuneError("the query is empty")
    kb = KnowledgeBase.open(out, embedder=embedder)
    hits = kb.search(query, k=k, mode=cast("Mode", mode))
    for hit in hits:
        if json_:
            typer.echo(json.dumps(hit_record(hit), ensure_ascii=False))
        else:
            _print_hit(hit)
    if not hits and not json_:
        stdout.print(f"no passage of {escape(str(out))} shares a word with the query (try --mode dense)")
