"""Tests for fedtune.data.builtin: the chatterbot corpus and how its odd entries are read."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest

from fedtune.data.builtin import BUILTINS, chatterbot_conversation, coerce_turn
from fedtune.data.types import validate_conversation


@pytest.fixture(scope="module")
def chatterbot() -> datasets.Dataset:
    return BUILTINS.get("chatterbot")()


def test_chatterbot_size_and_categories(chatterbot: datasets.Dataset) -> None:
    categories = Counter(chatterbot["category"])

    assert chatterbot.column_names == ["messages", "category"]
    assert len(chatterbot) >= 1500
    assert len(categories) >= 15
    assert {"ai", "tech support", "trivia"} <= set(categories)
    assert all(c == c.lower() for c in categories)


def test_chatterbot_conversations_are_valid_and_some_are_multi_turn(chatterbot: datasets.Dataset) -> None:
    convs = chatterbot["messages"]

    for i, conv in enumerate(convs):
        validate_conversation(conv, f"chatterbot record {i}")
        assert conv[-1]["role"] == "assistant"
    assert sum(len(c) > 2 for c in convs) >= 10


def test_chatterbot_is_deterministic(chatterbot: datasets.Dataset) -> None:
    again = BUILTINS.get("chatterbot")()

    assert again["messages"][:50] == chatterbot["messages"][:50]
    assert again["category"] == chatterbot["category"]


def test_entry_alternates_and_drops_unanswered_last_turn() -> None:
    conv = chatterbot_conversation(["q1", "a1", "q2"])

    assert conv == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]


def test_entry_with_unreadable_turn_stops_there() -> None:
    assert chatterbot_conversation(["q", None, "x", "y"]) is None
    assert chatterbot_conversation(["q", "a", {"k": 1}, "b"]) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_flat_string_entry_is_split_into_question_and_answer() -> None:
    # trivia.yml: `- In a game of bingo, ... "two little ducks"? - '22'` (lost its inner list)
    entry = "In a game of bingo, which number is two little ducks? - '22'"

    assert chatterbot_conversation(entry) == [
        {"role": "user", "content": "In a game of bingo, which number is two little ducks?"},
        {"role": "assistant", "content": "22"},
    ]
    assert chatterbot_conversation("just a sentence") is None


@pytest.mark.parametrize(
    ("turn", "text"),
    [("  hi ", "hi"), (1984, "1984"), (["a", "b"], "a b"), (None, None), ("  ", None), (True, None)],
)
def test_coerce_turn(turn: object, text: str | None) -> None:
    assert coerce_turn(turn) == text
