"""A tiny word-level tokenizer whose ids can be worked out by hand (id = position in VOCAB)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

VOCAB = [
    "<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>", "<system>",  # 0-6
    "hi", "hello", "how", "are", "you", "fine", "thanks", "be", "nice",  # 7-15
]  # fmt: skip

# One message per line, each closed by EOS; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_tokenizer(*, with_bos_prefix: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace-split words over VOCAB; optionally a post-processor that prepends <s>."""
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_bos_prefix:
        model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<user>", "<assistant>", "<system>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def tiny_tokenizer_bos() -> PreTrainedTokenizerFast:
    """Like tiny_tokenizer, but ``tokenizer(text)`` starts with <s> (as Llama's does)."""
    return make_tokenizer(with_bos_prefix=True)
