"""Federated case-base search without Flower: one client's answer, and the server's fusion by rank.

A client searches its own case base (the one it trains with) and returns only its top ``k``
passages with their ranks; the server fuses the clients' lists by reciprocal rank fusion
(:func:`fedtune.rag.fusion.rrf`). Raw retriever scores never travel: BM25 and cosine scores
of bases built apart are on different scales, ranks are not. The same passage held by two
clients (equal :func:`~fedtune.rag.sources.text_hash`) is one item, its RRF terms summed.
The Flower side is :mod:`fedtune.federated.case_search`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedtune.config import Config
from fedtune.data.pipeline import client_conversations
from fedtune.errors import FedtuneError
from fedtune.rag.client import case_base, kb_home
from fedtune.rag.fusion import RRF_K, rrf
from fedtune.rag.sources import text_hash
from fedtune.rag.store import Hit


@dataclass(frozen=True)
class CasePassage:
    """One passage a client returned: which client, its rank there (from 1), its id, source and text."""

    partition_id: int
    rank: int
    id: str
    source: str
    text: str


@dataclass(frozen=True)
class FusedPassage:
    """A passage of the fused ranking: its fused rank and RRF score, and where each client ranked it.

    ``found`` holds ``(partition_id, rank)`` for every client that returned it, by partition id;
    ``id`` and ``source`` are those of the first of them.
    """

    rank: int
    score: float
    id: str
    source: str
    text: str
    found: tuple[tuple[int, int], ...]

    @property
    def clients(self) -> tuple[int, ...]:
        """The partition ids of the clients that returned this passage."""
        return tuple(pid for pid, _ in self.found)


def fuse(by_client: Mapping[int, Sequence[CasePassage]], k: int, *, rrf_k: int = RRF_K) -> list[FusedPassage]:
    """The top ``k`` of the clients' rankings fused by RRF: ``score = sum 1 / (rrf_k + rank)``.

    Each client's list is read in rank order; rankings are taken in partition-id order, so a
    tie goes to the passage of the lower partition id (node ids are random per run, partition
    ids are not). Example with ``rrf_k = 60``: client 0 returns ``[A, B]``, client 1 ``[C, A]``:
    A scores 1/61 + 1/62, C 1/61, B 1/62, so the fused order is A, C, B.
    """
    rankings: list[list[str]] = []
    passages: dict[str, CasePassage] = {}
    found: dict[str, list[tuple[int, int]]] = {}
    for pid in sorted(by_client):
        ranking = []
        for p in sorted(by_client[pid], key=lambda p: p.rank):
            key = text_hash(p.text)
            passages.setdefault(key, p)
            found.setdefault(key, []).append((pid, p.rank))
            ranking.append(key)
        rankings.append(ranking)
    fused = enumerate(rrf(rankings, k=rrf_k, top=k), start=1)
    return [
        FusedPassage(rank, score, (p := passages[key]).id, p.source, p.text, tuple(found[key]))
        for rank, (key, score) in fused
    ]


def search_own_cases(
    cfg: Config,
    partition_id: int,
    question: str,
    k: int,
    *,
    data_path: str | None = None,
    state_dir: str | None = None,
    source: str | None = None,
) -> list[Hit]:
    """A client's top ``k`` case passages for ``question``: the case base it trains with, ``rag.mode``.

    The base is the client's training records (or ``source``, its SuperNode's ``rag.case_base``),
    indexed once under its state dir as in training (:func:`fedtune.rag.client.case_base`).
    """
    if cfg.rag.k_case == 0:
        raise FedtuneError("rag.k_case is 0: this client keeps no case base")
    train, _ = client_conversations(cfg, partition_id, data_path=data_path)
    kb = case_base(list(train["messages"]), cfg.rag, kb_home(state_dir), source)
    assert kb is not None  # k_case > 0
    return kb.search(question, k=k, mode=cfg.rag.mode)
