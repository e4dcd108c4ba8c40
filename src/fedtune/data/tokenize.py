"""Conversations to token ids with response-only labels.

The loss is on every assistant turn and nothing else. The *target* is the final assistant
response; the *source* is everything before it, earlier answers included (they keep their
labels). Each template segment is tokenized on its own and the ids concatenated, so a label
boundary is always a token boundary.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from fedtune.data.templates import Segment, Template, get_template
from fedtune.data.types import Conversation
from fedtune.errors import FedtuneError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross-entropy skips


def check_lengths(**lengths: int) -> None:
    """Refuse non-positive token limits, naming the config key."""
    for key, value in lengths.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FedtuneError(f"{key} must be a positive number of tokens, got {value!r}")


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's EOS id; every target ends with it."""
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise FedtuneError("the tokenizer has no eos_token; set one to train on conversations")
    return eos


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text``'s ids with no special tokens added (special-token text still maps to its id)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before a text (``[bos]`` for Llama, ``[]`` for GPT-2)."""
    plain, full = encode(tokenizer, "a"), list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def encode_segments(
    segments: list[Segment], tokenizer: PreTrainedTokenizerBase, template: Template
) -> tuple[list[int], list[int]]:
    """Ids and labels of source segments.

    Answers are labelled and, when the template writes no end-of-turn text, closed with a
    labelled EOS.
    """
    eos = eos_id(tokenizer)
    ids = special_prefix(tokenizer) if template.adds_special_prefix else []
    labels = [IGNORE_INDEX] * len(ids)
    for text, is_answer in segments:
        piece = encode(tokenizer, text)
        if is_answer and template.appends_eos and piece[-1:] != [eos]:
            piece.append(eos)
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    return ids, labels


def tokenize_conversation(
    conv: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    template: Template | str,
    *,
    max_source_length: int,
    max_target_length: int,
) -> dict[str, list[int]]:
    """Token ids, labels and attention mask of one conversation.

    Parameters
    ----------
    conv
        A conversation ending with an assistant response.
    tokenizer
        Any Hugging Face tokenizer with an EOS token.
    template
        How to render the conversation: a :class:`Template` or a name in ``TEMPLATES``
        (built for ``tokenizer``; pass the object when tokenizing many conversations).
    max_source_length
        Source tokens kept, counted from the end: old context is cut first.
    max_target_length
        Target tokens kept, EOS included: the response is cut to ``max_target_length - 1``
        tokens and EOS follows.

    Returns
    -------
    dict[str, list[int]]
        ``input_ids``, ``labels`` (``-100`` outside assistant turns) and ``attention_mask``;
        at most ``max_source_length + max_target_length`` long.
    """
    check_lengths(max_source_length=max_source_length, max_target_length=max_target_length)
    if not conv or conv[-1]["role"] != "assistant":
        raise FedtuneError("a training conversation must end with an assistant response")
    eos = eos_id(tokenizer)
    if isinstance(template, str):
        template = get_template(template, tokenizer)
    segments = template.segments(conv)
    last = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
    source_ids, source_labels = encode_segments(segments[:last], tokenizer, template)
    source_ids, source_labels = source_ids[-max_source_length:], source_labels[-max_source_length:]
    target = encode(tokenizer, segments[last][0])
    if target[-1:] == [eos]:
        target = target[:-1]
    target = [*target[: max_target_length - 1], eos]
    input_ids = source_ids + target
    return {
        "input_ids": input_ids,
        "labels": source_labels + target,
        "attention_mask": [1] * len(input_ids),
    }


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    template_name: str,
    max_source_length: int,
    max_target_length: int,
) -> datasets.Dataset:
    """Tokenize a converted dataset (column ``messages``); keeps ``category``, drops the rest.

    Returns
    -------
    datasets.Dataset
        Columns ``input_ids``, ``labels``, ``attention_mask`` (and ``category`` if present).
    """
    check_lengths(max_source_length=max_source_length, max_target_length=max_target_length)
    template = get_template(template_name, tokenizer)

    def one(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        try:
            return tokenize_conversation(
                row["messages"],
                tokenizer,
                template,
                max_source_length=max_source_length,
                max_target_length=max_target_length,
            )
        except FedtuneError as exc:
            raise FedtuneError(f"record {index}: {exc}") from None

    drop = [c for c in ds.column_names if c != "category"]
    out = ds.map(one, with_indices=True, remove_columns=drop, desc="tokenizing")
    log.info("tokenized %d conversations with template %r", len(out), template_name)
    return out


def build_generation_input(
    history: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    template_name: str,
    max_source_length: int,
) -> list[int]:
    """The ids a model continues to answer ``history`` (which ends with a user turn).

    Rendered exactly like a training source (earlier answers closed the same way), then
    cut from the left to ``max_source_length`` tokens.
    """
    check_lengths(max_source_length=max_source_length)
    template = get_template(template_name, tokenizer)
    template.check_open(history)
    ids, _ = encode_segments(template.segments(history), tokenizer, template)
    return ids[-max_source_length:]
