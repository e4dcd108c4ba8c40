"""Retrieval in chat (``fedtune chat RUN --rag``): the training augmenter on each user turn.

The run's ``[rag]`` section decides everything as in training: the reference base, the
embedder, the mode, ``k_case`` / ``k_reference``, the passage cut and the evidence prompt
(:func:`fedtune.rag.augment.augment` within ``data.max_source_length``). The case base is the
chatting user's own (``--case-base``: a record file, a text folder or an index folder), or none.
Only the turn being answered gets evidence; the history keeps the user's own words.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedtune.config import Config
from fedtune.data.types import Conversation
from fedtune.errors import FedtuneError
from fedtune.rag.augment import Budget, Evidence, augment, question_of
from fedtune.rag.client import case_base, kb_home, reference_base
from fedtune.rag.retrieve import Retriever

log = logging.getLogger(__name__)

SHOWN_CHARS = 80  # of each passage, in the list of what was used


@dataclass(frozen=True)
class ChatRetrieval:
    """A retriever over the chat's bases and the budget the evidence is fitted to."""

    retriever: Retriever
    budget: Budget

    def augment(self, history: Conversation) -> tuple[Conversation, list[Evidence]]:
        """``history`` with evidence before its last user turn, and the passages that fit."""
        (evidence,) = self.retriever.evidence_many([question_of(history)])
        return augment(history, evidence, self.budget)


def chat_retrieval(
    cfg: Config, tokenizer: PreTrainedTokenizerBase, *, case_source: str | None = None
) -> ChatRetrieval:
    """The augmenter of a run: its ``[rag]`` section, the reference base it names, ``case_source``.

    A FedtuneError when there is nothing to retrieve from (no reference base and no case base,
    or both turned off by ``k_reference`` / ``k_case``).
    """
    rag = cfg.rag
    if not rag.enabled:
        log.warning("this run trained without retrieval (rag.enabled is false); its [rag] section is used")
    if case_source is not None and rag.k_case == 0:
        raise FedtuneError("--case-base: the run's rag.k_case is 0, so no case passage would be used")
    cases = case_base([], rag, kb_home(None), case_source) if case_source is not None else None
    reference = reference_base(rag)
    if cases is None and reference is None:
        raise FedtuneError(
            "--rag: nothing to retrieve from (the run's config has no rag.reference or rag.k_reference "
            "is 0; give a case base with --case-base)"
        )
    budget = Budget.of(cfg, tokenizer)
    return ChatRetrieval(Retriever(rag, cases, reference), budget)


def describe(evidence: Evidence, number: int) -> str:
    """One line for a used passage: ``[origin n] id (source): first SHOWN_CHARS characters``."""
    text = " ".join(evidence.text.split())
    if len(text) > SHOWN_CHARS:
        text = text[: SHOWN_CHARS - 1] + "…"
    return f"[{evidence.origin} {number}] {evidence.id} ({evidence.source}): {text}"


def describe_all(evidence: list[Evidence]) -> list[str]:
    """:func:`describe` for each passage, numbered per origin as the prompt numbers them."""
    counts: dict[str, int] = {}
    lines = []
    for ev in evidence:
        counts[ev.origin] = counts.get(ev.origin, 0) + 1
        lines.append(describe(ev, counts[ev.origin]))
    return lines
