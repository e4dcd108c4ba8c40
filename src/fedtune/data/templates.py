"""Prompt templates: a conversation as text pieces, the assistant's pieces marked.

Every template answers two questions. :meth:`Template.segments` gives the pieces of a whole
conversation in order, ``True`` on the assistant responses (the loss targets); joining the
texts gives the rendered conversation. :meth:`Template.generation_prompt` gives the text a
model continues at inference. Templates are built by name from :data:`TEMPLATES`, with the
tokenizer they will be used with (``chat`` needs its chat template, ``llama2`` its BOS/EOS).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from fedtune.data.types import Conversation, Message
from fedtune.errors import FedtuneError
from fedtune.registry import Registry

Segment = tuple[str, bool]
TemplateFactory = Callable[[PreTrainedTokenizerBase | None], "Template"]

TEMPLATES: Registry[TemplateFactory] = Registry("prompt template")


class Template(ABC):
    """A way to render conversations for a causal LM."""

    name: str = ""
    #: The tokenizer closes every assistant turn with EOS: the template writes no end-of-turn text.
    appends_eos: bool = True
    #: The tokenizer's own special prefix (BOS, or ChatGLM's ``[gMASK]sop``) starts the token ids:
    #: the template writes none.
    adds_special_prefix: bool = True

    @abstractmethod
    def segments(self, conv: Conversation) -> list[Segment]:
        """The text pieces of ``conv`` in order, ``True`` for assistant responses.

        A conversation that ends with a user turn ends with the generation prompt, so that
        the pieces are the model's input at inference.
        """

    def generation_prompt(self, conv: Conversation) -> str:
        """The text a model continues to answer ``conv`` (which must end with a user turn)."""
        self.check_open(conv)
        return self.render(conv)

    def check_open(self, conv: Conversation) -> None:
        """Refuse a history that does not end with a user turn (nothing to answer)."""
        if not conv or conv[-1]["role"] == "assistant":
            raise FedtuneError(
                f"template {self.name!r}: a generation prompt needs a history ending with a user turn"
            )

    def render(self, conv: Conversation) -> str:
        """The whole conversation as one string (for display and tests)."""
        return "".join(text for text, _ in self.segments(conv))


def split_rounds(conv: Conversation, template: str) -> tuple[str, list[Message]]:
    """(system text, the other turns) for templates that need user/assistant alternation."""
    has_system = bool(conv) and conv[0]["role"] == "system"
    system, turns = (conv[0]["content"], conv[1:]) if has_system else ("", conv)
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise FedtuneError(
                f"template {template!r}: message {i + has_system} is {msg['role']!r}, expected {expected!r} "
                "(turns must alternate user/assistant after an optional system message)"
            )
    return system, turns


class RoundTemplate(Template):
    """A template rendered round by round: a user piece that ends with the answer header, then the answer.

    Subclasses say how the user piece of round ``n`` (from 1) looks.
    """

    answer_prefix = ""
    answer_suffix = ""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        del tokenizer  # plain-text prompts; subclasses that need special tokens read them

    @abstractmethod
    def user_piece(self, question: str, n: int, system: str) -> str: ...

    def segments(self, conv: Conversation) -> list[Segment]:
        system, turns = split_rounds(conv, self.name)
        pieces: list[Segment] = []
        for i, msg in enumerate(turns):
            if msg["role"] == "user":
                pieces.append((self.user_piece(msg["content"], i // 2 + 1, system), False))
            else:
                pieces.append((self.answer_prefix + msg["content"] + self.answer_suffix, True))
        return pieces


@TEMPLATES.register("alpaca")
class AlpacaTemplate(RoundTemplate):
    """Stanford Alpaca's prompt; a system message replaces its preamble."""

    name = "alpaca"
    preamble = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )

    def user_piece(self, question: str, n: int, system: str) -> str:
        head = f"{system or self.preamble}\n\n" if n == 1 else "\n\n"
        return f"{head}### Instruction:\n{question}\n\n### Response:\n"


@TEMPLATES.register("chatglm2")
class ChatGLM2Template(RoundTemplate):
    """ChatGLM2's ``[Round n]`` prompt; a system message goes first, before a blank line."""

    name = "chatglm2"

    def user_piece(self, question: str, n: int, system: str) -> str:
        head = (f"{system}\n\n" if system else "") if n == 1 else "\n\n"
        return f"{head}[Round {n}]\n\n问：{question}\n\n答："


@TEMPLATES.register("llama2")
class Llama2Template(RoundTemplate):
    r"""Llama-2-chat: ``<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s>``.

    BOS and EOS are the tokenizer's own special-token strings, which its tokenizer maps to
    the special ids (``"<s>"``/``"</s>"`` without a tokenizer).
    """

    name = "llama2"
    adds_special_prefix = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.bos = "<s>" if tokenizer is None else str(tokenizer.bos_token or "")
        self.eos = "</s>" if tokenizer is None else str(tokenizer.eos_token or "")
        self.appends_eos = not self.eos
        # Meta's reference tokenizes the answer as f" {a} " between BOS/EOS ids: the prompt
        # ends at "[/INST]", so inference does not end on a lone space token.
        self.answer_prefix = " "
        self.answer_suffix = f" {self.eos}" if self.eos else " "

    def user_piece(self, question: str, n: int, system: str) -> str:
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system and n == 1 else ""
        return f"{self.bos}[INST] {sys_block}{question} [/INST]"


@TEMPLATES.register("chat")
class ChatTemplate(Template):
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``).

    Pieces come from rendering prefixes of the conversation: the prompt before assistant
    turn ``i`` is ``messages[:i]`` rendered with the generation prompt, the answer is what
    ``messages[:i + 1]`` adds to it. The answer's labelled part ends at the last EOS text in
    it (e.g. ``<|im_end|>``), or else before trailing whitespace; the rest is scaffolding.
    A template whose renderings are not prefixes of one another (one that rewrites earlier
    turns) cannot be split this way and is refused.
    """

    name = "chat"
    appends_eos = False
    adds_special_prefix = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise FedtuneError(
                "template 'chat' needs a tokenizer with a chat template; this one has none, "
                f"use a named template ({', '.join(n for n in TEMPLATES.names() if n != 'chat')})"
            )
        self.tokenizer = tokenizer

    def _render(self, messages: Conversation, add_generation_prompt: bool) -> str:
        try:
            text: Any = self.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja raises its own types, templates raise_exception(...)
            raise FedtuneError(f"template 'chat': the tokenizer's chat template failed ({exc})") from None
        if not isinstance(text, str):
            raise FedtuneError("template 'chat': apply_chat_template did not return text")
        return text

    def _after(self, prefix: str, text: str, i: int) -> str:
        if not text.startswith(prefix):
            raise FedtuneError(
                f"template 'chat': the chat template is not prefix-stable (rendering messages up to {i} "
                "changes the text of earlier turns), so the answers cannot be located; "
                "use a named template instead (data.template)"
            )
        return text[len(prefix) :]

    def _split_answer(self, piece: str) -> tuple[str, str]:
        eos = self.tokenizer.eos_token
        if isinstance(eos, str) and eos and eos in piece:
            end = piece.rindex(eos) + len(eos)
        else:
            end = len(piece.rstrip())
        return piece[:end], piece[end:]

    def segments(self, conv: Conversation) -> list[Segment]:
        pieces: list[Segment] = []
        done = ""
        for i, msg in enumerate(conv):
            if msg["role"] != "assistant":
                continue
            prompt = self._render(conv[:i], add_generation_prompt=True)
            full = self._render(conv[: i + 1], add_generation_prompt=False)
            pieces.append((self._after(done, prompt, i), False))
            answer, tail = self._split_answer(self._after(prompt, full, i + 1))
            pieces += [(answer, True), (tail, False)]
            done = full
        if conv and conv[-1]["role"] != "assistant":
            prompt = self._render(conv, add_generation_prompt=True)
            pieces.append((self._after(done, prompt, len(conv)), False))
        # Empty scaffolding pieces carry no tokens; empty answers stay, they still get an EOS.
        return [(text, target) for text, target in pieces if text or target]

    def generation_prompt(self, conv: Conversation) -> str:
        self.check_open(conv)
        return self._render(conv, add_generation_prompt=True)


def get_template(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> Template:
    """Build the template ``name`` (a name in :data:`TEMPLATES`) for ``tokenizer``."""
    return TEMPLATES.get(name, where="data.template")(tokenizer)
