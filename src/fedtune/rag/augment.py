"""Evidence into prompts: origin-marked passages before the question, fitted to the source budget.

The last user turn of a conversation becomes::

    Evidence:
    [case 1] Question: ... Answer: ...
    [reference 1] Title. Text ...

    Question: <the user's question>

Passages are cut (then dropped, lowest rank first) so the whole source fits
``data.max_source_length``: the question is never the part that is cut. Pure functions but
for the tokenizer, which only counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from transformers import PreTrainedTokenizerBase

from fedtune.config import Config
from fedtune.data.tokenize import build_generation_input, encode
from fedtune.data.types import Conversation, message

Origin = Literal["case", "reference"]
HEADER = "Evidence:"
NO_EVIDENCE = "(no evidence found)"
MIN_PASSAGE_TOKENS = 8  # a shorter cut is noise: drop the passage instead
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Evidence:
    """A passage put in front of a question: which base it came from, its id, where it is, its text."""

    origin: Origin
    id: str
    source: str
    text: str


def question_of(conv: Conversation) -> str:
    """The question an example retrieves with: its last user turn."""
    users = [m["content"] for m in conv if m["role"] == "user"]
    return users[-1] if users else ""


def case_text(conv: Conversation) -> str:
    """A record as a case-base passage: ``Question: ... Answer: ...`` (the system prompt left out)."""
    labels = {"user": "Question:", "assistant": "Answer:"}
    return " ".join(f"{labels[m['role']]} {m['content'].strip()}" for m in conv if m["role"] in labels)


def holds_answer(text: str, answer: str, threshold: float) -> bool:
    """Whether ``text`` contains at least ``threshold`` of ``answer``'s words (counted with multiplicity)."""
    want = Counter(w.lower() for w in _WORD.findall(answer))
    if not want:
        return False
    have = Counter(w.lower() for w in _WORD.findall(text))
    found = sum(min(n, have[w]) for w, n in want.items())
    return found / sum(want.values()) >= threshold


def evidence_prompt(question: str, evidence: Sequence[Evidence], instruction: str = "") -> str:
    """The user turn with ``evidence`` numbered per origin (``[case 1]``, ``[reference 1]``) before it.

    ``instruction`` (``rag.instruction``), when given, stands between the evidence and the question.
    """
    counts: Counter[str] = Counter()
    lines = [HEADER]
    for ev in evidence:
        counts[ev.origin] += 1
        lines.append(f"[{ev.origin} {counts[ev.origin]}] {ev.text}")
    if not evidence:
        lines.append(NO_EVIDENCE)
    middle = f"\n\n{instruction}" if instruction else ""
    return "\n".join(lines) + f"{middle}\n\nQuestion: {question}"


def with_prompt(conv: Conversation, prompt: str) -> Conversation:
    """``conv`` with its last user turn replaced by ``prompt``."""
    last = max(i for i, m in enumerate(conv) if m["role"] == "user")
    return [*conv[:last], message("user", prompt), *conv[last + 1 :]]


@dataclass(frozen=True)
class Budget:
    """How evidence is fitted: the tokenizer and template, and the limits."""

    tokenizer: PreTrainedTokenizerBase
    template: str
    max_source_length: int
    max_passage_tokens: int
    instruction: str = ""

    @classmethod
    def of(cls, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> Budget:
        """The budget a run's config sets: its template, source limit, passage cut and instruction."""
        rag, data = cfg.rag, cfg.data
        instruction = (rag.instruction or "").replace("{decline_text}", rag.decline_text)
        return cls(tokenizer, data.template, data.max_source_length, rag.max_passage_tokens, instruction)

    def source_tokens(self, history: Conversation) -> int:
        """Tokens of the source that ends with ``history``'s last user turn."""
        return len(build_generation_input(history, self.tokenizer, self.template, max_source_length=10**9))


def _history(conv: Conversation) -> Conversation:
    """The turns up to and including the last user turn (the source of the final answer)."""
    last = max(i for i, m in enumerate(conv) if m["role"] == "user")
    return conv[: last + 1]


def _cut(budget: Budget, text: str, tokens: int) -> str:
    ids = encode(budget.tokenizer, text)
    return text if len(ids) <= tokens else str(budget.tokenizer.decode(ids[:tokens])).strip()


def fit_evidence(conv: Conversation, evidence: Sequence[Evidence], budget: Budget) -> list[Evidence]:
    """``evidence`` cut to ``max_passage_tokens`` each, then cut or dropped (last first) to fit.

    The question and earlier turns are kept whole: when they alone exceed the limit, no
    evidence is kept (and the usual left truncation then applies to them).
    """
    history, question = _history(conv), question_of(conv)
    kept = [replace(ev, text=_cut(budget, ev.text, budget.max_passage_tokens)) for ev in evidence]
    for _ in range(2 * len(kept) + 2):
        if not kept:
            return []
        over = (
            budget.source_tokens(with_prompt(history, evidence_prompt(question, kept, budget.instruction)))
            - budget.max_source_length
        )
        if over <= 0:
            return kept
        last = kept[-1]
        room = len(encode(budget.tokenizer, last.text)) - over - 2  # a cut can re-tokenize a little longer
        if room < MIN_PASSAGE_TOKENS:
            kept.pop()
        else:
            kept[-1] = replace(last, text=_cut(budget, last.text, room))
    return []


def augment(
    conv: Conversation, evidence: Sequence[Evidence], budget: Budget
) -> tuple[Conversation, list[Evidence]]:
    """``conv`` with the evidence that fits in front of its question, and that evidence."""
    kept = fit_evidence(conv, evidence, budget)
    return with_prompt(conv, evidence_prompt(question_of(conv), kept, budget.instruction)), kept
