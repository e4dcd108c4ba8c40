"""Tests for fedtune.data.templates: exact renderings and the chat template's pieces."""

from __future__ import annotations

from typing import cast

import pytest
from transformers import PreTrainedTokenizerFast

from fedtune.data.templates import TEMPLATES, get_template
from fedtune.data.types import Conversation
from fedtune.errors import FedtuneError

TWO_ROUNDS: Conversation = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
WITH_SYSTEM: Conversation = [{"role": "system", "content": "Be brief."}, *TWO_ROUNDS]


def test_registry_names() -> None:
    assert TEMPLATES.names() == ["alpaca", "chat", "chatglm2", "llama2"]


def test_alpaca_two_rounds() -> None:
    template = get_template("alpaca")

    assert template.render(TWO_ROUNDS) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is 2+2?\n\n### Response:\n4"
        "\n\n### Instruction:\nAnd 3+3?\n\n### Response:\n6"
    )
    assert [target for _, target in template.segments(TWO_ROUNDS)] == [False, True, False, True]


def test_alpaca_system_replaces_preamble_and_generation_prompt() -> None:
    prompt = get_template("alpaca").generation_prompt(WITH_SYSTEM[:2])

    assert prompt == "Be brief.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n"


def test_chatglm2_two_rounds() -> None:
    template = get_template("chatglm2")

    assert (
        template.render(TWO_ROUNDS)
        == "[Round 1]\n\n问：What is 2+2?\n\n答：4\n\n[Round 2]\n\n问：And 3+3?\n\n答：6"
    )
    assert template.generation_prompt(TWO_ROUNDS[:3]) == (
        "[Round 1]\n\n问：What is 2+2?\n\n答：4\n\n[Round 2]\n\n问：And 3+3?\n\n答："
    )


def test_llama2_two_rounds_with_system() -> None:
    template = get_template("llama2")

    assert template.segments(WITH_SYSTEM) == [
        ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]", False),
        (" 4 </s>", True),
        ("<s>[INST] And 3+3? [/INST]", False),
        (" 6 </s>", True),
    ]
    assert (
        template.render(TWO_ROUNDS)
        == "<s>[INST] What is 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST] 6 </s>"
    )
    assert not template.appends_eos  # "</s>" is the tokenizer's EOS text, tokenized to its id


def test_named_templates_need_alternating_turns() -> None:
    conv: Conversation = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]

    with pytest.raises(FedtuneError, match=r"template 'alpaca': message 1 is 'user', expected 'assistant'"):
        get_template("alpaca").segments(conv)


def test_generation_prompt_needs_an_open_turn() -> None:
    with pytest.raises(FedtuneError, match="ending with a user turn"):
        get_template("chatglm2").generation_prompt(TWO_ROUNDS)


def test_chat_pieces_from_prefix_renderings(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    template = get_template("chat", tiny_tokenizer)
    conv: Conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine"},
    ]

    # The answer's label ends with the EOS text "</s>"; the newline after it is scaffolding.
    assert template.segments(conv) == [
        ("<user> hi </s>\n<assistant> ", False),
        ("hello </s>", True),
        ("\n", False),
        ("<user> how are you </s>\n<assistant> ", False),
        ("fine </s>", True),
        ("\n", False),
    ]
    whole = tiny_tokenizer.apply_chat_template(cast(list[dict[str, str]], conv), tokenize=False)
    assert template.render(conv) == whole
    assert template.generation_prompt(conv[:3]) == (
        "<user> hi </s>\n<assistant> hello </s>\n<user> how are you </s>\n<assistant> "
    )


def test_chat_refuses_a_template_that_rewrites_history(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}<{{ m['role'] }}> {{ m['content'] }} </s>"
        "{% else %}[old] {% endif %}{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    conv: Conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

    with pytest.raises(FedtuneError, match="not prefix-stable"):
        get_template("chat", tiny_tokenizer).segments(conv)


def test_chat_needs_a_chat_template(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    tiny_tokenizer.chat_template = None

    with pytest.raises(FedtuneError, match=r"needs a tokenizer with a chat template.*alpaca, chatglm2"):
        get_template("chat", tiny_tokenizer)


def test_unknown_template_names_the_config_key() -> None:
    with pytest.raises(FedtuneError, match=r"^data.template: unknown prompt template 'vicuna'"):
        get_template("vicuna")
