"""Data formats: converters ``record -> Conversation`` and writers ``Conversation -> record``.

Every reader is registered in :data:`FORMATS` and every writer in :data:`WRITERS` under the
format's name; nothing downstream of this module sees a format-specific field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedtune.data.types import Conversation, Message, Role, message, validate_conversation
from fedtune.errors import FedtuneError
from fedtune.registry import Registry

Record = Mapping[str, Any]
Converter = Callable[[Record, str], Conversation]
Writer = Callable[[Conversation, str, str], dict[str, Any]]

FORMATS: Registry[Converter] = Registry("data format")
WRITERS: Registry[Writer] = Registry("output data format")

EXPLAIN_FIELD = "explanation"


def render_explanation(explanation: str, conclusion: str) -> str:
    """The assistant text of a record with an explanation (the ``explanation`` format)."""
    return f"EXPLAIN: {explanation}\nCONCLUSION: {conclusion}"


# --------------------------------------------------------------------------- field access


def _str_field(record: Record, name: str, where: str, *, required: bool = True) -> str:
    """``record[name]`` as a string; absent or null optional fields read as ""."""
    value = record.get(name)
    if value is None:
        if required:
            raise FedtuneError(f"{where}: missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise FedtuneError(f"{where}: field {name!r} must be a string, not {type(value).__name__}")
    return value


def _list_field(record: Record, name: str, where: str, *, required: bool = True) -> list[Any]:
    value = record.get(name)
    if value is None:
        if required:
            raise FedtuneError(f"{where}: missing field {name!r}")
        return []
    if not isinstance(value, list):
        raise FedtuneError(f"{where}: field {name!r} must be a list, not {type(value).__name__}")
    return value


def _with_system(system: str, turns: list[Message]) -> Conversation:
    return [message("system", system), *turns] if system else turns


def _prompt(instruction: str, extra: str) -> str:
    """An instruction with its optional input/context after a blank line."""
    return f"{instruction}\n\n{extra}" if extra else instruction


# --------------------------------------------------------------------------- readers


@FORMATS.register("alpaca")
def from_alpaca(record: Record, where: str) -> Conversation:
    """``{instruction, input?, output, system?}`` -> one user/assistant round."""
    user = _prompt(
        _str_field(record, "instruction", where), _str_field(record, "input", where, required=False)
    )
    turns = [message("user", user), message("assistant", _str_field(record, "output", where))]
    return _with_system(_str_field(record, "system", where, required=False), turns)


@FORMATS.register("explanation")
def from_explanation(record: Record, where: str) -> Conversation:
    r"""An alpaca record with an ``explanation`` field, answered as ``EXPLAIN: ...\nCONCLUSION: ...``."""
    conv = from_alpaca(record, where)
    explanation = _str_field(record, EXPLAIN_FIELD, where)
    conv[-1] = message("assistant", render_explanation(explanation, conv[-1]["content"]))
    return conv


@FORMATS.register("dolly")
def from_dolly(record: Record, where: str) -> Conversation:
    """``{instruction, context?, response, category?}`` -> one round (category is read by the loader)."""
    user = _prompt(
        _str_field(record, "instruction", where), _str_field(record, "context", where, required=False)
    )
    return [message("user", user), message("assistant", _str_field(record, "response", where))]


def _history_pairs(history: list[Any], where: str) -> list[tuple[str, str]]:
    """ChatGLM history as ``[[q, a], ...]`` or as BAIYANG's flat ``[q, a, q, a, ...]``."""
    if all(isinstance(h, str) for h in history):
        if len(history) % 2:
            raise FedtuneError(f"{where}: field 'history' is a flat list of odd length {len(history)}")
        return list(zip(history[::2], history[1::2], strict=True))
    pairs = []
    for i, pair in enumerate(history):
        ok = isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)
        if not ok:
            raise FedtuneError(
                f"{where}: field 'history' item {i} must be a [question, answer] pair of strings"
            )
        pairs.append((pair[0], pair[1]))
    return pairs


@FORMATS.register("chatglm")
def from_chatglm(record: Record, where: str) -> Conversation:
    """``{prompt, response, history?}``; earlier rounds come first."""
    conv: Conversation = []
    for q, a in _history_pairs(_list_field(record, "history", where, required=False), where):
        conv += [message("user", q), message("assistant", a)]
    conv.append(message("user", _str_field(record, "prompt", where)))
    conv.append(message("assistant", _str_field(record, "response", where)))
    return conv


_SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _turns(
    record: Record, field: str, role_key: str, text_key: str, roles: Mapping[str, Role], where: str
) -> Conversation:
    conv: Conversation = []
    for i, turn in enumerate(_list_field(record, field, where)):
        at = f"{where}: {field}[{i}]"
        if not isinstance(turn, Mapping):
            raise FedtuneError(f"{at} must be an object with {role_key!r} and {text_key!r}")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise FedtuneError(f"{at}: field {role_key!r} is {role!r}; expected one of {', '.join(roles)}")
        conv.append(message(roles[role], _content(turn.get(text_key), f"{at}: field {text_key!r}")))
    return conv


def _content(value: object, at: str) -> str:
    """A string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise FedtuneError(f"{at} must be a string, not {type(value).__name__}")


@FORMATS.register("sharegpt")
def from_sharegpt(record: Record, where: str) -> Conversation:
    """``{conversations: [{from: human|gpt|system, value}, ...]}``."""
    return _turns(record, "conversations", "from", "value", _SHAREGPT_ROLES, where)


@FORMATS.register("openai")
def from_openai(record: Record, where: str) -> Conversation:
    """``{messages: [{role, content}, ...]}``."""
    roles: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}
    return _turns(record, "messages", "role", "content", roles, where)


def convert_record(record: object, fmt: str, where: str, *, explain: bool = False) -> Conversation:
    r"""Convert one record of format ``fmt`` to a validated conversation.

    Parameters
    ----------
    record
        The raw record (a JSON object, a CSV row, ...).
    fmt
        A name in :data:`FORMATS`.
    where
        Where the record is (``"data.jsonl:12"``), for error messages.
    explain
        If the record has an ``explanation`` field, answer in ``EXPLAIN: ...\nCONCLUSION: ...``
        form whatever ``fmt`` is (the ``explanation`` format always does).
    """
    converter = FORMATS.get(fmt, where=where)
    if not isinstance(record, Mapping):
        raise FedtuneError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    conv = validate_conversation(converter(record, where), where)
    if explain and fmt != "explanation" and record.get(EXPLAIN_FIELD) is not None:
        explanation = _str_field(record, EXPLAIN_FIELD, where)
        conv[-1] = message("assistant", render_explanation(explanation, conv[-1]["content"]))
    return conv


# --------------------------------------------------------------------------- writers


def _rounds(conv: Conversation, where: str, fmt: str) -> tuple[str, list[tuple[str, str]]]:
    """Split a conversation into (system, [(user, assistant), ...]); it must alternate."""
    has_system = bool(conv) and conv[0]["role"] == "system"
    system, turns = (conv[0]["content"], conv[1:]) if has_system else ("", conv)
    roles = [m["role"] for m in turns]
    if len(turns) % 2 or roles != ["user", "assistant"] * (len(turns) // 2) or not turns:
        raise FedtuneError(
            f"{where}: format {fmt!r} needs alternating user/assistant turns ending with an answer"
        )
    return system, [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]


def _single_round(conv: Conversation, where: str, fmt: str) -> tuple[str, str, str]:
    system, rounds = _rounds(conv, where, fmt)
    if len(rounds) != 1:
        raise FedtuneError(f"{where}: format {fmt!r} holds one round, this conversation has {len(rounds)}")
    return system, *rounds[0]


def _with_category(record: dict[str, Any], category: str) -> dict[str, Any]:
    # Formats without a category field still carry one, so category partitions survive a round trip.
    return {**record, "category": category} if category else record


@WRITERS.register("alpaca")
def to_alpaca(conv: Conversation, category: str, where: str) -> dict[str, Any]:
    """One round -> ``{instruction, input: "", output, system?, category?}``."""
    system, user, answer = _single_round(conv, where, "alpaca")
    record = {"instruction": user, "input": "", "output": answer}
    return _with_category({**record, "system": system} if system else record, category)


@WRITERS.register("dolly")
def to_dolly(conv: Conversation, category: str, where: str) -> dict[str, Any]:
    """One round without a system message -> ``{instruction, context: "", response, category}``."""
    system, user, answer = _single_round(conv, where, "dolly")
    if system:
        raise FedtuneError(f"{where}: format 'dolly' has no system message")
    return {"instruction": user, "context": "", "response": answer, "category": category}


@WRITERS.register("chatglm")
def to_chatglm(conv: Conversation, category: str, where: str) -> dict[str, Any]:
    """Rounds without a system message -> ``{prompt, response, history: [[q, a], ...], category?}``."""
    system, rounds = _rounds(conv, where, "chatglm")
    if system:
        raise FedtuneError(f"{where}: format 'chatglm' has no system message")
    (prompt, response), history = rounds[-1], [[q, a] for q, a in rounds[:-1]]
    return _with_category({"prompt": prompt, "response": response, "history": history}, category)


@WRITERS.register("sharegpt")
def to_sharegpt(conv: Conversation, category: str, where: str) -> dict[str, Any]:
    """Any conversation -> ``{conversations: [{from: system|human|gpt, value}, ...], category?}``."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": names[m["role"]], "value": m["content"]} for m in conv]
    return _with_category({"conversations": turns}, category)


@WRITERS.register("openai")
def to_openai(conv: Conversation, category: str, where: str) -> dict[str, Any]:
    """Any conversation -> ``{messages: [{role, content}, ...], category?}``."""
    return _with_category({"messages": [dict(m) for m in conv]}, category)


def to_format(conv: Conversation, name: str, category: str = "", where: str = "") -> dict[str, Any]:
    """Write a conversation as a record of format ``name`` (a name in :data:`WRITERS`).

    ``category`` is written as the record's ``category`` field when non-empty. Raises
    :class:`FedtuneError` naming ``where`` when the format cannot hold the conversation
    (e.g. a multi-turn conversation as ``alpaca``).
    """
    return WRITERS.get(name, where=where)(conv, category, where or "conversation")
