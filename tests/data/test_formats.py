"""Tests for fedtune.data.formats and fedtune.data.types: every reader, every writer, errors."""

from __future__ import annotations

import pytest

from fedtune.data.formats import FORMATS, WRITERS, convert_record, to_format
from fedtune.data.types import Conversation, Role, validate_conversation
from fedtune.errors import FedtuneError

U: Role = "user"
A: Role = "assistant"
S: Role = "system"


def turns(*pairs: tuple[Role, str]) -> Conversation:
    return [{"role": role, "content": text} for role, text in pairs]


def test_registries_hold_every_format() -> None:
    assert FORMATS.names() == ["alpaca", "chatglm", "dolly", "explanation", "openai", "sharegpt"]
    assert WRITERS.names() == ["alpaca", "chatglm", "dolly", "openai", "sharegpt"]


def test_alpaca_appends_input_after_a_blank_line_and_keeps_system() -> None:
    record = {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be brief."}

    conv = convert_record(record, "alpaca", "x.jsonl:1")

    assert conv == turns((S, "Be brief."), (U, "Add.\n\n2 and 3"), (A, "5"))


def test_alpaca_without_input_or_system() -> None:
    conv = convert_record({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca", "r")

    assert conv == turns((U, "Hi"), (A, "Hello"))


def test_dolly_context_is_like_alpaca_input() -> None:
    record = {"instruction": "Who?", "context": "Ada wrote code.", "response": "Ada", "category": "qa"}

    assert convert_record(record, "dolly", "r") == turns((U, "Who?\n\nAda wrote code."), (A, "Ada"))


@pytest.mark.parametrize(
    "history",
    [[["q1", "a1"], ["q2", "a2"]], ["q1", "a1", "q2", "a2"]],
    ids=["pairs", "baiyang-flat"],
)
def test_chatglm_both_history_forms(history: list) -> None:
    record = {"prompt": "q3", "response": "a3", "history": history}

    conv = convert_record(record, "chatglm", "r")

    assert conv == turns((U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"), (U, "q3"), (A, "a3"))


def test_chatglm_odd_flat_history_is_an_error() -> None:
    with pytest.raises(FedtuneError, match=r"^d.jsonl:4: .*'history'.*odd length 3"):
        convert_record({"prompt": "q", "response": "a", "history": ["x", "y", "z"]}, "chatglm", "d.jsonl:4")


def test_sharegpt_maps_human_gpt_system() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
        ]
    }

    assert convert_record(record, "sharegpt", "r") == turns((S, "sys"), (U, "hi"), (A, "hello"))


def test_sharegpt_unknown_speaker_names_the_turn() -> None:
    record = {"conversations": [{"from": "bot", "value": "hi"}]}

    with pytest.raises(FedtuneError, match=r"^f.json: record 2: conversations\[0\]: field 'from' is 'bot'"):
        convert_record(record, "sharegpt", "f.json: record 2")


def test_openai_messages_and_text_parts() -> None:
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
        ]
    }

    assert convert_record(record, "openai", "r") == turns((U, "ab"), (A, "c"))


def test_explanation_renders_exactly() -> None:
    record = {"instruction": "Is 7 prime?", "output": "Yes", "explanation": "Only 1 and 7 divide it."}

    conv = convert_record(record, "explanation", "r")

    assert conv[-1]["content"] == "EXPLAIN: Only 1 and 7 divide it.\nCONCLUSION: Yes"


def test_explain_option_applies_to_any_format() -> None:
    record = {"instruction": "Q", "context": "", "response": "R", "explanation": "E"}

    plain = convert_record(record, "dolly", "r")
    explained = convert_record(record, "dolly", "r", explain=True)
    already = convert_record(
        {"instruction": "Q", "output": "R", "explanation": "E"}, "explanation", "r", explain=True
    )

    assert plain[-1]["content"] == "R"
    assert explained[-1]["content"] == "EXPLAIN: E\nCONCLUSION: R"
    assert already[-1]["content"] == "EXPLAIN: E\nCONCLUSION: R"  # not rendered twice


@pytest.mark.parametrize(
    ("fmt", "record", "field"),
    [
        ("alpaca", {"input": "", "output": "o"}, "instruction"),
        ("alpaca", {"instruction": "i"}, "output"),
        ("dolly", {"instruction": "i"}, "response"),
        ("chatglm", {"response": "r"}, "prompt"),
        ("sharegpt", {"messages": []}, "conversations"),
        ("openai", {"conversations": []}, "messages"),
        ("explanation", {"instruction": "i", "output": "o"}, "explanation"),
    ],
)
def test_missing_field_names_field_and_place(fmt: str, record: dict, field: str) -> None:
    with pytest.raises(FedtuneError, match=rf"^data.jsonl:12: missing field '{field}'"):
        convert_record(record, fmt, "data.jsonl:12")


def test_ill_typed_field_names_field_and_place() -> None:
    with pytest.raises(FedtuneError, match=r"^data.jsonl:3: field 'output' must be a string, not int"):
        convert_record({"instruction": "i", "output": 5}, "alpaca", "data.jsonl:3")


def test_unknown_format_lists_known_ones() -> None:
    with pytest.raises(FedtuneError, match=r"unknown data format 'yaml' \(known: alpaca, chatglm"):
        convert_record({}, "yaml", "r")


def test_validate_conversation_rules() -> None:
    with pytest.raises(FedtuneError, match="non-empty"):
        validate_conversation([], "w")
    with pytest.raises(FedtuneError, match="message 0 has role 'bot'"):
        validate_conversation([{"role": "bot", "content": "x"}], "w")
    with pytest.raises(FedtuneError, match="no assistant turn"):
        validate_conversation(turns((U, "x")), "w")
    with pytest.raises(FedtuneError, match="message 1 is a system message"):
        validate_conversation(turns((U, "x"), (S, "s"), (A, "y")), "w")


@pytest.mark.parametrize(
    ("fmt", "record"),
    [
        ("alpaca", {"instruction": "", "input": "", "output": ""}),
        ("dolly", {"instruction": " ", "context": "", "response": "\n"}),
        ("openai", {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}),
        ("sharegpt", {"conversations": [{"from": "system", "value": ""}, {"from": "gpt", "value": " "}]}),
    ],
)
def test_all_blank_record_is_refused_naming_its_place(fmt: str, record: dict) -> None:
    with pytest.raises(FedtuneError, match=r"^data.jsonl:7: the record is empty \(every message is blank\)$"):
        convert_record(record, fmt, "data.jsonl:7")


@pytest.mark.parametrize(
    ("fmt", "record", "index"),
    [
        ("alpaca", {"instruction": "Say hi", "output": ""}, 1),
        ("chatglm", {"prompt": "q", "response": "  "}, 1),
        ("chatglm", {"prompt": "q2", "response": "a2", "history": [["q1", ""]]}, 1),  # an earlier round
        (
            "openai",
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": ""}]},
            1,
        ),
    ],
)
def test_blank_answer_is_refused_naming_the_turn(fmt: str, record: dict, index: int) -> None:
    with pytest.raises(
        FedtuneError,
        match=rf"^data.jsonl:7: message {index} \(an assistant answer\) is blank; a record with an empty "
        "response cannot be trained on$",
    ):
        convert_record(record, fmt, "data.jsonl:7")


def test_blank_prompt_with_an_answer_is_kept() -> None:
    conv = convert_record({"instruction": "", "output": "Hello."}, "alpaca", "r")

    assert conv == turns((U, ""), (A, "Hello."))


# --------------------------------------------------------------------------- writers

TWO_ROUNDS = turns((U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"))


def test_to_alpaca_with_system_and_category() -> None:
    record = to_format(turns((S, "s"), (U, "q"), (A, "a")), "alpaca", "math")

    assert record == {"instruction": "q", "input": "", "output": "a", "system": "s", "category": "math"}


def test_to_alpaca_refuses_multi_turn_naming_the_record() -> None:
    with pytest.raises(FedtuneError, match=r"^in.jsonl:7: format 'alpaca' holds one round, .* has 2"):
        to_format(TWO_ROUNDS, "alpaca", where="in.jsonl:7")


def test_to_chatglm_history_is_pairs() -> None:
    record = to_format(TWO_ROUNDS, "chatglm")

    assert record == {"prompt": "q2", "response": "a2", "history": [["q1", "a1"]]}


def test_to_dolly_keeps_category() -> None:
    record = to_format(turns((U, "q"), (A, "a")), "dolly", "open_qa")

    assert record == {"instruction": "q", "context": "", "response": "a", "category": "open_qa"}


def test_to_sharegpt_and_openai() -> None:
    conv = turns((S, "s"), (U, "q"), (A, "a"))

    assert to_format(conv, "sharegpt") == {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert to_format(conv, "openai", "c") == {"messages": conv, "category": "c"}


@pytest.mark.parametrize("fmt", ["chatglm", "sharegpt", "openai"])
def test_multi_turn_round_trips(fmt: str) -> None:
    record = to_format(TWO_ROUNDS, fmt)

    assert convert_record(record, fmt, "r") == TWO_ROUNDS
