"""A packed adapter: the byte layout, read back; anything malformed refused, naming what."""

from __future__ import annotations

import json

import pytest
from flwr.app import Array, ArrayRecord

from fedtune.federated.protocol import ProtocolError
from fedtune.federated.protocol.tensors import PACKED, TENSORS, Tensor, pack, unpack


def _record(data: bytes) -> ArrayRecord:
    return ArrayRecord({TENSORS: Array("uint8", (len(data),), PACKED, data)})


def _blob(header: object, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(4, "little") + raw + body


def test_the_layout_is_length_header_then_tensor_bytes_in_order() -> None:
    # Execute
    record = pack("float16", [Tensor("a", (2,), b"\x01\x02\x03\x04"), Tensor("b", (0,), b"")])

    # Assert: one array; 4-byte length, the JSON header, a's 4 bytes, nothing for b
    assert list(record) == [TENSORS] and record[TENSORS].stype == PACKED
    header = b'{"format":"float16","tensors":[["a",[2],4],["b",[0],0]]}'
    assert record[TENSORS].data == len(header).to_bytes(4, "little") + header + b"\x01\x02\x03\x04"
    fmt, tensors = unpack(record)
    assert fmt == "float16"
    assert tensors == [Tensor("a", (2,), b"\x01\x02\x03\x04"), Tensor("b", (0,), b"")]


@pytest.mark.parametrize(
    ("record", "error"),
    [
        (
            ArrayRecord({"w": Array("float32", (1,), "numpy.ndarray", b"")}),
            r"expected one packed array 'tensors'",
        ),
        (_record(b"\x10\x00\x00\x00{}"), "cut short"),
        (_record(b"\x03\x00\x00\x00{x}"), "header is not JSON"),
        (_record(_blob({"tensors": []})), "has no 'format'"),
        (_record(_blob({"format": "float32"})), "has no 'tensors' list"),
        (
            _record(_blob({"format": "float32", "tensors": [["a", [-1], 0]]})),
            r"is not \[key, shape, nbytes\]",
        ),
        (
            _record(_blob({"format": "float32", "tensors": [["a", [1], 4], ["a", [1], 0]]}, b"abcd")),
            "'a' twice",
        ),
        (_record(_blob({"format": "float32", "tensors": [["a", [1], 4]]}, b"ab")), "'a' runs past the end"),
        (_record(_blob({"format": "float32", "tensors": [["a", [1], 1]]}, b"ab")), "1 bytes after the last"),
    ],
)
def test_a_malformed_packed_record_is_refused(record: ArrayRecord, error: str) -> None:
    with pytest.raises(ProtocolError, match=f"client 4: .*{error}"):
        unpack(record, where="client 4")
