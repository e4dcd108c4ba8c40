"""The one conversation type every data format converts to and every template reads."""

from __future__ import annotations

from typing import Literal, TypedDict

from fedtune.errors import FedtuneError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")

# The column of a loaded dataset that names each record's origin ("data.jsonl:12"), so that
# later stages (partitioning) can point at the record at fault.
WHERE = "where"


class Message(TypedDict):
    """One turn of a conversation."""

    role: Role
    content: str


Conversation = list[Message]


def message(role: Role, content: str) -> Message:
    """Build a :class:`Message` (a typed shorthand for the dict literal)."""
    return {"role": role, "content": content}


def validate_conversation(conv: object, where: str) -> Conversation:
    """Check that ``conv`` is a well-formed conversation and return it.

    Parameters
    ----------
    conv
        The candidate conversation.
    where
        Where it came from (``"data.jsonl:12"``); every error message starts with it.

    Returns
    -------
    Conversation
        ``conv`` itself, now known to be a non-empty list of messages with legal roles,
        string contents, a system message only in first place, and at least one
        assistant turn, none of them blank (a user turn may be blank).

    Raises
    ------
    FedtuneError
        Naming ``where`` and the offending message index.
    """
    if not isinstance(conv, list) or not conv:
        raise FedtuneError(f"{where}: a conversation must be a non-empty list of messages")
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise FedtuneError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise FedtuneError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise FedtuneError(f"{where}: message {i} content must be a string, not {type(content).__name__}")
        # Templates put the system prompt in front of the first round; one anywhere else has
        # no rendering in the named templates.
        if role == "system" and i != 0:
            raise FedtuneError(f"{where}: message {i} is a system message; only the first may be")
    if not any(msg["role"] == "assistant" for msg in conv):
        raise FedtuneError(f"{where}: the conversation has no assistant turn")
    if not any(msg["content"].strip() for msg in conv):
        raise FedtuneError(f"{where}: the record is empty (every message is blank)")
    for i, msg in enumerate(conv):
        # The loss is taken on assistant turns: a blank one would teach the model to answer
        # that prompt with nothing.
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise FedtuneError(
                f"{where}: message {i} (an assistant answer) is blank; a record with an empty "
                "response cannot be trained on"
            )
    return conv
