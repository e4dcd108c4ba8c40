"""Many tensors in one Flower ``Array``: an adapter crosses the wire as one object, not one per tensor.

Flower 1.41 stores and moves each ``Array`` of a message as an object of its own: the SuperLink
and every SuperNode push and pull them one by one. An adapter of 240 tensors (SmolLM2, q/k/v/o)
cost 240 object round trips per message, 13.5 s to pull two train replies on loopback
(docs/deployment.md, "What a deployment round costs"). So an adapter travels packed: one
``ArrayRecord`` holding one ``Array`` under the key :data:`TENSORS`, of stype :data:`PACKED`,
whose data is

- 4 bytes, little-endian: the length ``n`` of the header;
- ``n`` bytes of UTF-8 JSON: ``{"format": F, "tensors": [[key, shape, nbytes], ...]}``;
- each tensor's bytes, in the header's order, ``nbytes`` each, nothing after.

``F`` names how every tensor's bytes encode its values (``float16``, ``float32``, or a blockwise
format such as ``int8.b64``, :mod:`fedtune.federated.records`); this module only lays the bytes
out and reads them back, refusing anything malformed with a :class:`ProtocolError` naming ``where``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import NamedTuple

from flwr.app import Array, ArrayRecord

from fedtune.federated.protocol.wire import ProtocolError

PACKED = "fedtune.packed.v1"  # the stype of a packed adapter
TENSORS = "tensors"  # its one array's key in the ArrayRecord
_LENGTH = 4  # bytes of the header length


class Tensor(NamedTuple):
    """One tensor of a packed record: its key, its shape and its encoded bytes."""

    key: str
    shape: tuple[int, ...]
    data: bytes


def pack(fmt: str, tensors: Iterable[Tensor]) -> ArrayRecord:
    """``tensors`` (bytes already encoded in format ``fmt``) as one packed array."""
    tensors = list(tensors)
    header = json.dumps(
        {"format": fmt, "tensors": [[t.key, list(t.shape), len(t.data)] for t in tensors]},
        separators=(",", ":"),
    ).encode()
    blob = b"".join([len(header).to_bytes(_LENGTH, "little"), header, *(t.data for t in tensors)])
    return ArrayRecord({TENSORS: Array("uint8", (len(blob),), PACKED, blob)})


def _header(data: bytes, where: str) -> tuple[dict[str, object], int]:
    """The parsed header and the offset of the first tensor's bytes."""
    size = int.from_bytes(data[:_LENGTH], "little")
    if len(data) < _LENGTH or _LENGTH + size > len(data):
        raise ProtocolError(f"{where}: packed adapter of {len(data)} bytes is cut short")
    try:
        header = json.loads(data[_LENGTH : _LENGTH + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"{where}: packed adapter header is not JSON ({err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("format"), str):
        raise ProtocolError(f"{where}: packed adapter header has no 'format'")
    return header, _LENGTH + size


def _entry(raw: object, where: str) -> tuple[str, tuple[int, ...], int]:
    """One ``[key, shape, nbytes]`` header entry, checked."""
    if isinstance(raw, list) and len(raw) == 3 and isinstance(raw[0], str) and isinstance(raw[1], list):
        key: str = raw[0]
        shape: list[object] = raw[1]
        nbytes: object = raw[2]
        dims_ok = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        if dims_ok and isinstance(nbytes, int) and not isinstance(nbytes, bool) and nbytes >= 0:
            return key, tuple(shape), nbytes  # type: ignore[arg-type]
    raise ProtocolError(f"{where}: packed adapter entry {str(raw)[:80]} is not [key, shape, nbytes]")


def unpack(record: ArrayRecord, where: str = "adapter") -> tuple[str, list[Tensor]]:
    """The format and the tensors of a packed record (see the module docstring)."""
    array = record.get(TENSORS)
    if len(record) != 1 or array is None or array.stype != PACKED:
        found = ", ".join(f"{k!r} ({a.stype})" for k, a in list(record.items())[:3])
        raise ProtocolError(f"{where}: expected one packed array {TENSORS!r} ({PACKED}), got {found}")
    data = array.data
    header, offset = _header(data, where)
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise ProtocolError(f"{where}: packed adapter header has no 'tensors' list")
    tensors, seen = [], set()
    for raw in entries:
        key, shape, nbytes = _entry(raw, where)
        if key in seen:
            raise ProtocolError(f"{where}: packed adapter holds {key!r} twice")
        seen.add(key)
        if offset + nbytes > len(data):
            raise ProtocolError(f"{where}: {key!r} runs past the end of the packed adapter")
        tensors.append(Tensor(key, shape, data[offset : offset + nbytes]))
        offset += nbytes
    if offset != len(data):
        raise ProtocolError(f"{where}: {len(data) - offset} bytes after the last tensor")
    return str(header["format"]), tensors
