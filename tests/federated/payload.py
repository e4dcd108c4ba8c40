"""Payload audits: a Grid that records what crosses it, and a search of replies for private text."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedtune.federated.protocol.tensors import TENSORS, unpack

ADAPTER_KEY = re.compile(r"\.lora_[AB]\.weight$")
NEEDLE = 24  # characters from each end of a text: long enough never to occur by chance


class RecordingGrid:
    """The ServerApp's Grid, keeping every reply the clients send back."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies: list[Message] = []
        self.sent: list[Message] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.sent += messages
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        got = list(self._grid.pull_messages(message_ids))
        self.replies += got
        return got

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.sent += messages
        got = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies += got
        return got


def adapter_keys(record: ArrayRecord) -> tuple[str, list[str]]:
    """A packed adapter's format and its tensors' keys (the record itself holds one array)."""
    fmt, tensors = unpack(record)
    return fmt, [t.key for t in tensors]


def payload(reply: Message) -> tuple[list[str], list[bytes]]:
    """Every string and byte string in a reply: record names, keys, values, array bytes, error text."""
    if reply.has_error():
        return [reply.error.reason or ""], []
    strings, blobs = [], []
    for name, record in reply.content.items():
        strings.append(name)
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                strings.append(key)
                blobs.append(array.data)
            if list(record) == [TENSORS]:  # a packed adapter: its tensors' keys and bytes too
                fmt, tensors = unpack(record)
                strings += [fmt, *(t.key for t in tensors)]
                blobs += [t.data for t in tensors]
            continue
        for key, value in record.items():
            strings.append(key)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str):
                    strings.append(v)
                elif isinstance(v, bytes):
                    blobs.append(v)
    return strings, blobs


def needles(texts: Iterable[str]) -> set[str]:
    out = set()
    for text in texts:
        text = text.strip()
        if len(text) >= 8:
            out |= {text[:NEEDLE], text[-NEEDLE:]}
    return out


def leaks(reply: Message, needles: set[str]) -> set[str]:
    strings, blobs = payload(reply)
    return {n for n in needles if any(n in s for s in strings) or any(n.encode() in b for b in blobs)}
