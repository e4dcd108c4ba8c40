"""Federated search of the clients' case bases over Flower (``query.case``), and ``fedtune kb ask``.

The server sends every node a :class:`~fedtune.federated.protocol.CaseQuery`; a client whose
owner allows it (``rag.share_case_base``: its SuperNode's node config, else the run config)
answers with its top ``k`` case passages and their ranks (:class:`CaseHits`), any other raises,
so Flower returns an error reply (the client side: ``client_app.case_query``). The server fuses
the answers by rank (:func:`fedtune.rag.federated.fuse`) and reports the clients that refused
or did not answer. Nothing else about a client's cases leaves it: no scores, no count, no
embeddings.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.federated.protocol import CaseHits, CaseQuery, ProtocolError, case_query_message, read_reply
from fedtune.federated.server_app import collect, wait_for_nodes
from fedtune.rag.federated import CasePassage, FusedPassage, fuse

log = logging.getLogger(__name__)


_EXCEPTION_TYPE = re.compile(r"^<class '[^']*'>:<'")  # how Flower's error reply names the exception


def short_reason(reason: str) -> str:
    """The client's own message in a Flower error reason (which may hold a whole Ray traceback)."""
    lines = [x.strip() for x in reason.splitlines() if x.strip()] or [reason]
    return _EXCEPTION_TYPE.sub("", lines[-1]).removesuffix("'>").rsplit("Message: ", 1)[-1]


@dataclass(frozen=True)
class SearchResult:
    """A federated search: the fused passages, who answered, who refused (node id -> reason)."""

    passages: list[FusedPassage]
    answered: tuple[int, ...]  # partition ids
    refused: dict[int, str] = field(default_factory=dict)  # node id -> the client's error or "no reply"


def federated_search(
    grid: Grid, node_ids: list[int], cfg: Config, question: str, k: int, *, timeout: float | None = None
) -> SearchResult:
    """Ask every node in ``node_ids`` for its top ``k`` case passages; fuse the answers by RRF.

    ``cfg`` travels with the query (the clients build their case bases from it, as in
    training). A refusal, a bad reply or no reply within ``timeout`` (default ``fed.timeout``)
    is reported in :attr:`SearchResult.refused`, not raised: the others' passages are fused.
    """
    query = CaseQuery(cfg, question, k).check()
    messages = [case_query_message(query, n) for n in node_ids]
    replies = collect(grid, messages, cfg.fed.timeout if timeout is None else timeout, lambda *_: None)
    by_client: dict[int, list[CasePassage]] = {}
    refused: dict[int, str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.debug("case query: node %s: %s", node, reply.error.reason)
            refused[node] = short_reason(reply.error.reason or f"error reply (code {reply.error.code})")
            continue
        try:
            hits = read_reply(reply, CaseHits).check()
        except ProtocolError as err:
            refused[node] = str(err)
            continue
        if hits.partition_id in by_client:
            refused[node] = f"a second answer for partition {hits.partition_id}"
            continue
        by_client[hits.partition_id] = [
            CasePassage(hits.partition_id, *row)
            for row in zip(hits.ranks, hits.ids, hits.sources, hits.texts, strict=True)
        ]
    answered_nodes = {r.metadata.src_node_id for r in replies}
    refused.update({n: "no reply within the timeout" for n in node_ids if n not in answered_nodes})
    return SearchResult(fuse(by_client, k), tuple(sorted(by_client)), refused)


def search_app(cfg: Config, question: str, k: int, results: list[SearchResult]) -> ServerApp:
    """A ServerApp that waits for the clients, runs one federated search and appends it to ``results``."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        results.append(federated_search(grid, wait_for_nodes(grid, cfg), cfg, question, k))

    return server


def ask(cfg: Config, question: str, k: int) -> SearchResult:
    """``fedtune kb ask``: one federated case-base search in Flower's simulation runtime."""
    from fedtune.federated.simulation import run_server_app

    if not cfg.rag.share_case_base:
        log.warning("rag.share_case_base is off in this config: every client will refuse")
    results: list[SearchResult] = []
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.CRITICAL)  # a refusal is an answer here: keep Flower's tracebacks of it out
    try:
        run_server_app(cfg, search_app(cfg, question, k, results))
    finally:
        flwr_log.setLevel(level)
    if not results:
        raise FedtuneError("the federated search ended without a result (see the log)")
    return results[0]
