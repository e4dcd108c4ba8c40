"""A client's two bases queried apart (the dual task): its private case base and the reference base.

Each example's question gets ``rag.k_case`` passages from the case base and ``rag.k_reference``
from the reference base, each list ranked within its own base (hybrid: RRF of BM25 and dense),
case passages first. A decline example asks for passages that do *not* hold its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedtune.config import RagConfig
from fedtune.rag.augment import Evidence, Origin, holds_answer
from fedtune.rag.store import Hit, KnowledgeBase

DECLINE_DEPTH = 8  # extra passages fetched for a decline example, to replace those holding the answer


@dataclass(frozen=True)
class Retriever:
    """The bases one client reads: its case base (never leaves it) and the shared reference base."""

    cfg: RagConfig
    case: KnowledgeBase | None
    reference: KnowledgeBase | None

    def _bases(self) -> list[tuple[Origin, KnowledgeBase, int]]:
        bases: list[tuple[Origin, KnowledgeBase | None, int]] = [
            ("case", self.case, self.cfg.k_case),
            ("reference", self.reference, self.cfg.k_reference),
        ]
        return [(origin, kb, k) for origin, kb, k in bases if kb is not None and k > 0]

    def evidence_many(
        self,
        questions: Sequence[str],
        *,
        exclude: Sequence[frozenset[str]] = (),
        without: Sequence[str | None] = (),
    ) -> list[list[Evidence]]:
        """Evidence per question, case passages first.

        ``exclude[i]``: passage hashes question ``i`` must not get (its own record).
        ``without[i]``: an answer; passages holding it are skipped (a decline example), None: keep all.
        """
        out: list[list[Evidence]] = [[] for _ in questions]
        drop = list(without) or [None] * len(questions)
        for origin, kb, k in self._bases():
            depth = k + (DECLINE_DEPTH if any(a is not None for a in drop) else 0)
            hits = kb.search_many(questions, k=depth, mode=self.cfg.mode, exclude=exclude)
            for i, row in enumerate(hits):
                out[i] += [_evidence(origin, h) for h in self._keep(row, drop[i], k)]
        return out

    def _keep(self, hits: list[Hit], answer: str | None, k: int) -> list[Hit]:
        if answer is not None:
            hits = [h for h in hits if not holds_answer(h.passage.text, answer, self.cfg.answer_overlap)]
        return hits[:k]


def _evidence(origin: Origin, hit: Hit) -> Evidence:
    return Evidence(origin=origin, id=hit.passage.id, source=hit.passage.source, text=hit.passage.text)
