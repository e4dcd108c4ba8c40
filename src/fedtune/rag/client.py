"""A client's retrieval: its case base built where it runs, the reference base, its examples augmented.

The case base is the client's own training records (or the file/folder its SuperNode names
with ``rag.case_base``), indexed on the client under ``<state-dir or ~/.cache/fedtune>/kb/case/``
by content hash; it never leaves the client. The reference base is opened from its folder, or
for ``wiki`` indexed once into the fedtune cache.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config, RagConfig
from fedtune.config.rag import DeclineMode
from fedtune.data.types import Conversation, message
from fedtune.errors import FedtuneError
from fedtune.models.load import cache_dir
from fedtune.rag.augment import Budget, Evidence, augment, case_text, holds_answer, question_of
from fedtune.rag.retrieve import Retriever
from fedtune.rag.sources import Passage, read_docs, text_hash, to_passages
from fedtune.rag.store import LEXICAL, MANIFEST, KnowledgeBase, build

log = logging.getLogger(__name__)


def kb_home(state_dir: str | None) -> Path:
    """Where a client keeps the indexes it builds: its node's state dir, else the fedtune cache."""
    return (Path(state_dir) if state_dir else cache_dir()) / "kb"


def _slug(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:10]


def _index_once(folder: Path, passages: list[Passage], embedder: str) -> KnowledgeBase:
    if not (folder / MANIFEST).exists():
        build(passages, folder, embedder=embedder, progress=len(passages) > 1000)
    return KnowledgeBase.open(folder, embedder=embedder)


def _digest(*parts: str) -> str:
    # a cached index is keyed by what made it: the texts, the embedder and the bm25 tokens
    return hashlib.sha1("\n".join([str(sorted(LEXICAL.items())), *parts]).encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def reference_base(cfg: RagConfig) -> KnowledgeBase | None:
    """The shared authoritative base, opened once per process.

    ``rag.reference`` is an index folder, or documents indexed once into the fedtune cache
    (keyed by their content): ``wiki``, ``wiki:CATEGORY[,CATEGORY]``, a record file or a
    text folder (see :func:`fedtune.rag.sources.read_docs`).
    """
    if cfg.reference is None or cfg.k_reference == 0:
        return None
    if (Path(cfg.reference) / MANIFEST).exists():
        return KnowledgeBase.open(cfg.reference, embedder=cfg.embedder)
    passages = list(to_passages(read_docs(cfg.reference)))
    digest = _digest(cfg.embedder, *(p.text for p in passages))
    log.info("rag.reference %r: %d passages, index %s", cfg.reference, len(passages), digest)
    return _index_once(cache_dir() / "kb" / "reference" / digest, passages, cfg.embedder)


def case_passages(convs: list[Conversation]) -> list[Passage]:
    """A client's training records as case-base passages (``Question: ... Answer: ...``)."""
    return [Passage(id=f"case:{i}", source=f"record {i}", text=case_text(c)) for i, c in enumerate(convs)]


def case_base(
    convs: list[Conversation], cfg: RagConfig, home: Path, source: str | None
) -> KnowledgeBase | None:
    """The client's case base: from ``source`` (an index folder or documents) or from ``convs``."""
    if cfg.k_case == 0:
        return None
    if source and (Path(source) / MANIFEST).exists():
        return KnowledgeBase.open(source, embedder=cfg.embedder)
    passages = list(to_passages(read_docs(source))) if source else case_passages(convs)
    if not passages:
        raise FedtuneError(f"rag.case_base: {source or 'the training split'} gives an empty case base")
    return _index_once(
        home / "case" / _digest(cfg.embedder, *(p.text for p in passages)), passages, cfg.embedder
    )


def decline_set(n: int, fraction: float, seed: int) -> set[int]:
    """The ``round(fraction * n)`` of ``n`` examples that become decline examples, chosen with ``seed``."""
    return set(random.Random(seed).sample(range(n), round(fraction * n)))


def task_of(evidence: list[Evidence], answer: str, overlap: float) -> str:
    """The task: ``case_task`` (a case passage holds the answer), ``reference_task`` or ``no_answer``."""
    for origin in ("case", "reference"):
        if any(e.origin == origin and holds_answer(e.text, answer, overlap) for e in evidence):
            return f"{origin}_task"
    return "no_answer"


def augment_dataset(
    ds: Dataset,
    retriever: Retriever,
    budget: Budget,
    *,
    decline_fraction: float = 0.0,
    decline_mode: DeclineMode = "replace",
    seed: int = 0,
) -> tuple[Dataset, Counter[str]]:
    """Every example of ``ds`` (column ``messages``) with evidence in front of its question.

    An example never gets its own record from the case base. A ``decline_fraction`` share
    (chosen with ``seed``) gets a decline example: only passages that do not hold its answer,
    and ``rag.decline_text`` as its target; ``decline_mode`` ``"replace"`` puts it in the
    example's place, ``"pair"`` right after the example, which stays. Returns the dataset and
    counts of what went in: passages per origin, passages cut for length, declines, and per
    other example its task (:func:`task_of`).
    """
    convs: list[Conversation] = list(ds["messages"])
    declines = decline_set(len(convs), decline_fraction, seed)
    # (row of ds, declined?) per output example
    rows = [(i, d) for i in range(len(convs)) for d in _decline_flags(i in declines, decline_mode)]
    evidence = retriever.evidence_many(
        [question_of(convs[i]) for i, _ in rows],
        exclude=[frozenset({text_hash(case_text(convs[i]))}) for i, _ in rows],
        without=[convs[i][-1]["content"] if d else None for i, d in rows],
    )
    stats: Counter[str] = Counter(examples=len(rows), declines=len(declines))
    out = []
    for (i, declined), ev in zip(rows, evidence, strict=True):
        conv = convs[i]
        if declined:
            conv = [*conv[:-1], message("assistant", retriever.cfg.decline_text)]
        new, kept = augment(conv, ev, budget)
        stats.update(e.origin for e in kept)
        stats["cut"] += len(ev) - len(kept)
        if not declined:  # a decline example's target is the decline text, not a task's answer
            stats[task_of(kept, conv[-1]["content"], retriever.cfg.answer_overlap)] += 1
        out.append(new)
    columns: dict[str, Any] = {"messages": out}
    if "category" in ds.column_names:
        categories = ds["category"]
        columns["category"] = [categories[i] for i, _ in rows]
    return Dataset.from_dict(columns), stats


def _decline_flags(chosen: bool, mode: DeclineMode) -> tuple[bool, ...]:
    """What an example becomes: itself, its decline example, or both (``pair``)."""
    if not chosen:
        return (False,)
    if mode == "pair":
        return (False, True)
    if mode == "replace":
        return (True,)
    raise ValueError(f"rag.decline_mode: {mode!r} is neither 'replace' nor 'pair'")


def client_retriever(
    cfg: RagConfig, train: Dataset, *, state_dir: str | None = None, source: str | None = None
) -> Retriever:
    """A client's retriever: its case base (from ``train`` or ``source``) and the reference base."""
    cases = case_base(list(train["messages"]), cfg, kb_home(state_dir), source)
    return Retriever(cfg, cases, reference_base(cfg))


def augment_split(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    test: Dataset,
    *,
    state_dir: str | None = None,
    source: str | None = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """A client's (train, test) conversations with evidence; decline examples in train only.

    The case base is built from ``train`` (or ``source``): held-out records are never in it.
    """
    rag = cfg.rag
    retriever = client_retriever(rag, train, state_dir=state_dir, source=source)
    budget = Budget.of(cfg, tokenizer)
    train, train_stats = augment_dataset(
        train,
        retriever,
        budget,
        decline_fraction=rag.decline_fraction,
        decline_mode=rag.decline_mode,
        seed=seed,
    )
    test, test_stats = augment_dataset(test, retriever, budget)
    log.info("rag: train %s; test %s", dict(train_stats), dict(test_stats))
    return train, test
