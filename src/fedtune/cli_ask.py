"""``fedtune kb ask``: one federated search of the clients' case bases, fused by rank.

Runs Flower's simulation runtime with the config's clients and a ServerApp that only sends
the case query (:mod:`fedtune.federated.case_search`); prints the fused passages with the
clients they came from, and the clients that refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedtune.errors import FedtuneError

out = Console()
err = Console(stderr=True)


def kb_ask(
    question: Annotated[str, typer.Argument(help="the question to search the clients' case bases for")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="dotted override, e.g. rag.share_case_base=true")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="passages per client and fused")] = 5,
    json_: Annotated[bool, typer.Option("--json", help="one JSON object per line, for scripts")] = False,
) -> None:
    """Ask every client of the config's federation for its top K case passages; print them fused by RRF.

    A client answers only when rag.share_case_base allows it (its SuperNode's node config, else
    the config); the others are listed as refused. Each client searches the case base it trains
    with (its training records, or its node's rag.case_base) in rag.mode.
    """
    from fedtune.config import load_config
    from fedtune.federated.case_search import ask

    if not question.strip():
        raise FedtuneError("the question is empty")
    result = ask(load_config(config, set_ or []), question, k)
    for node, reason in sorted(result.refused.items()):
        err.print(f"node {node} refused: {escape(reason)}")
    if not result.answered:
        raise FedtuneError(f"no client shared its case base ({len(result.refused)} refused)")
    for p in result.passages:
        if json_:
            typer.echo(json.dumps({**asdict(p), "clients": list(p.clients)}, ensure_ascii=False))
            continue
        where = ", ".join(f"client {pid} #{rank}" for pid, rank in p.found)
        head = f"[bold]{p.rank}.[/bold] {escape(p.id)}  [dim]{escape(p.source)}[/dim]"
        out.print(f"{head}  rrf {p.score:.4f}  {where}")
        out.print(f"   {escape(p.text)}", highlight=False)
    if not json_:
        out.print(f"answered: clients {', '.join(map(str, result.answered))}")
