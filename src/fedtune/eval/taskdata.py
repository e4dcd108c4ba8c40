"""The data of fedtune's own lm-eval tasks (``eval/tasks/``), built from the offline wiki summaries.

``fedtune_wiki_mc``: "What is <title>?" with four choices, the first sentence of the
article and of three others from the same category (any category when it has fewer than
four articles). ``fedtune_wiki_gen``: "What is <title>?" answered in free text, scored against
the article's first sentence by BLEU and chrF (generation, not a choice among given answers).
``python -m fedtune.eval.taskdata`` rewrites the shipped files; a test checks that the shipped
files are what this builds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from fedtune.data.wiki import QUESTION, first_sentence, wiki_articles

TASKS_DIR = Path(__file__).parent / "tasks"
WIKI_MC = TASKS_DIR / "wiki_mc.jsonl"
WIKI_GEN = TASKS_DIR / "wiki_gen.jsonl"


def wiki_mc_records(n: int = 60, seed: int = 0, choices: int = 4) -> list[dict[str, Any]]:
    """``n`` questions ``{"question", "choices", "label"}``, chosen and shuffled with ``seed``."""
    rng = random.Random(seed)
    arts = list(wiki_articles())
    by_cat: dict[str, list[int]] = {}
    for i, art in enumerate(arts):
        by_cat.setdefault(art["category"], []).append(i)
    out = []
    for i in rng.sample(range(len(arts)), n):
        pool = [j for j in by_cat[arts[i]["category"]] if j != i]
        if len(pool) < choices - 1:
            pool = [j for j in range(len(arts)) if j != i]
        picked = [i, *rng.sample(pool, choices - 1)]
        rng.shuffle(picked)
        out.append(
            {
                "question": QUESTION.format(title=arts[i]["title"]),
                "choices": [first_sentence(arts[j]["extract"]) for j in picked],
                "label": picked.index(i),
            }
        )
    return out


def wiki_gen_records(n: int = 40, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` questions ``{"question", "answer"}``: the answer is the article's first sentence."""
    rng = random.Random(seed)
    arts = list(wiki_articles())
    return [
        {"question": QUESTION.format(title=arts[i]["title"]), "answer": first_sentence(arts[i]["extract"])}
        for i in rng.sample(range(len(arts)), n)
    ]


def jsonl(records: list[dict[str, Any]]) -> str:
    """Records as JSON lines (UTF-8 kept)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


if __name__ == "__main__":
    WIKI_MC.write_text(jsonl(wiki_mc_records()), encoding="utf-8")
    WIKI_GEN.write_text(jsonl(wiki_gen_records()), encoding="utf-8")
