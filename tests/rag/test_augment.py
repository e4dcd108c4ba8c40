"""Evidence in prompts: marking, the answer-overlap test, fitting to the source budget."""

from __future__ import annotations

import pytest

from fedtune.config import ModelConfig
from fedtune.data.tokenize import build_generation_input, tokenize_conversation
from fedtune.data.types import message
from fedtune.models.load import load_tokenizer
from fedtune.rag.augment import (
    NO_EVIDENCE,
    Budget,
    Evidence,
    augment,
    case_text,
    evidence_prompt,
    fit_evidence,
    holds_answer,
    question_of,
)

CONV = [message("user", "What is a cat?"), message("assistant", "A cat is a small feline.")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name="tiny-llama"))


def ev(origin: str, text: str, i: int = 0) -> Evidence:
    return Evidence(origin=origin, id=f"{origin}:{i}", source=f"src{i}", text=text)  # type: ignore[arg-type]


def test_question_and_case_text():
    conv = [
        message("system", "Be brief."),
        *CONV,
        message("user", "And a dog?"),
        message("assistant", "A dog."),
    ]
    assert question_of(conv) == "And a dog?"
    assert case_text(CONV) == "Question: What is a cat? Answer: A cat is a small feline."


def test_evidence_prompt_numbers_each_origin_apart():
    prompt = evidence_prompt("Q?", [ev("case", "c one"), ev("case", "c two", 1), ev("reference", "r one")])
    assert prompt == "Evidence:\n[case 1] c one\n[case 2] c two\n[reference 1] r one\n\nQuestion: Q?"
    assert evidence_prompt("Q?", []) == f"Evidence:\n{NO_EVIDENCE}\n\nQuestion: Q?"


@pytest.mark.parametrize(
    ("text", "answer", "threshold", "expected"),
    [
        ("the cat is a small feline indeed", "A cat is a small feline.", 0.7, True),  # 5 of 6 words
        ("a dog barks", "A cat is a small feline.", 0.7, False),  # 1 of 6 ("a")... and "a" twice: 1/6
        ("a a cat", "A cat is a small feline.", 0.5, True),  # a x2 + cat = 3 of 6
        ("a a cat", "A cat is a small feline.", 0.51, False),
        ("anything", "...", 0.1, False),  # an answer with no words is never held
    ],
)
def test_holds_answer_counts_words_with_multiplicity(text, answer, threshold, expected):
    assert holds_answer(text, answer, threshold) is expected


def test_fit_keeps_everything_when_it_fits(tokenizer):
    budget = Budget(tokenizer, "chat", max_source_length=512, max_passage_tokens=64)
    evidence = [ev("case", "Cats purr."), ev("reference", "Felines are mammals.", 1)]
    assert fit_evidence(CONV, evidence, budget) == evidence


def test_fit_cuts_passages_not_the_question(tokenizer):
    long = " ".join(f"word{i}" for i in range(200))
    bare = len(build_generation_input(CONV[:1], tokenizer, "chat", 10**6))
    limit = bare + 60  # room for the evidence frame and a few dozen passage tokens
    budget = Budget(tokenizer, "chat", max_source_length=limit, max_passage_tokens=1000)
    conv, kept = augment(CONV, [ev("case", long), ev("reference", long, 1)], budget)
    source = build_generation_input(conv[:1], tokenizer, "chat", 10**6)
    assert len(source) <= limit
    assert conv[0]["content"].endswith("Question: What is a cat?")  # the question is whole
    assert 1 <= len(kept) <= 2 and kept[0].text.startswith("word0 word1")
    assert len(kept[0].text) < len(long)
    # tokenized for training, nothing of the source is cut: it is all within max_source_length
    ids = tokenize_conversation(conv, tokenizer, "chat", max_source_length=limit, max_target_length=32)
    assert tokenizer.decode(ids["input_ids"]).count("Question: What is a cat?") == 1


def test_fit_caps_each_passage(tokenizer):
    long = " ".join(f"word{i}" for i in range(200))
    budget = Budget(tokenizer, "chat", max_source_length=4096, max_passage_tokens=10)
    (kept,) = fit_evidence(CONV, [ev("case", long)], budget)
    assert len(tokenizer(kept.text, add_special_tokens=False)["input_ids"]) <= 10


def test_fit_drops_all_evidence_when_the_question_alone_is_too_long(tokenizer):
    budget = Budget(tokenizer, "chat", max_source_length=5, max_passage_tokens=64)
    assert fit_evidence(CONV, [ev("case", "Cats purr.")], budget) == []


def test_instruction_stands_between_evidence_and_question():
    prompt = evidence_prompt("Q?", [ev("case", "c one")], "Use the evidence.")
    assert prompt == "Evidence:\n[case 1] c one\n\nUse the evidence.\n\nQuestion: Q?"


def test_budget_of_a_config_fills_the_decline_text_into_the_instruction(tokenizer, tiny_config):
    cfg = tiny_config.model_copy(
        update={
            "rag": tiny_config.rag.model_copy(
                update={"instruction": "If it is not there, say: {decline_text}", "decline_text": "Unknown."}
            )
        }
    )
    budget = Budget.of(cfg, tokenizer)
    assert budget.instruction == "If it is not there, say: Unknown."
    assert (budget.max_source_length, budget.template) == (cfg.data.max_source_length, cfg.data.template)
    conv, _ = augment(CONV, [ev("reference", "Cats purr.")], budget)
    tail = "Cats purr.\n\nIf it is not there, say: Unknown.\n\nQuestion: What is a cat?"
    assert conv[0]["content"].endswith(tail)


def test_fit_counts_the_instruction_in_the_source(tokenizer):
    long = " ".join(f"word{i}" for i in range(200))
    bare = len(build_generation_input(CONV[:1], tokenizer, "chat", 10**6))
    limit = bare + 60
    instruction = " ".join(["Answer from the evidence only."] * 4)
    budget = Budget(tokenizer, "chat", limit, max_passage_tokens=1000, instruction=instruction)
    conv, kept = augment(CONV, [ev("case", long)], budget)
    assert len(build_generation_input(conv[:1], tokenizer, "chat", 10**6)) <= limit
    assert instruction in conv[0]["content"] and kept  # the passage was cut to make room, not dropped
