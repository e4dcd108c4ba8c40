"""Scores of generated answers against references: ROUGE-L, BLEU, exact match.

ROUGE-L is rouge-score's, with a tokenizer that keeps non-ASCII text (its default one keeps
only ``[a-z0-9]`` and so scores a Chinese or Greek answer 0); BLEU is sacrebleu's corpus BLEU;
exact match compares SQuAD-style normalised strings. Pure functions over lists of strings.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import sacrebleu
from rouge_score import rouge_scorer

# one token per CJK character / kana / hangul syllable (these scripts write no spaces), else
# runs of letters and digits in any script
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class UnicodeTokenizer:
    """rouge-score's tokenizer interface (``tokenize(text) -> list[str]``) for any script."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())


def rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F1 of one answer: LCS-based, over :class:`UnicodeTokenizer` tokens."""
    return float(_SCORER.score(reference, answer)["rougeL"].fmeasure)


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's rule)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(reference: str, answer: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalise(reference) == normalise(answer))


@dataclass(frozen=True)
class Scores:
    """A set of answers' scores: means of ROUGE-L F1 and exact match, corpus BLEU (0-100)."""

    n: int
    rouge_l: float
    bleu: float
    exact_match: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def score(references: Sequence[str], answers: Sequence[str]) -> Scores:
    """Score ``answers`` against ``references`` (same length, paired by position).

    BLEU is sacrebleu's corpus BLEU with its default ``13a`` tokenizer over the whole set
    (not a mean of sentence BLEU); an empty set scores 0 everywhere.
    """
    if len(references) != len(answers):
        raise ValueError(f"{len(references)} references but {len(answers)} answers")
    n = len(answers)
    if n == 0:
        return Scores(0, 0.0, 0.0, 0.0)
    rouge = sum(rouge_l(r, a) for r, a in zip(references, answers, strict=True)) / n
    em = sum(exact_match(r, a) for r, a in zip(references, answers, strict=True)) / n
    bleu = sacrebleu.corpus_bleu(list(answers), [list(references)]).score
    return Scores(n, rouge, float(bleu), em)
