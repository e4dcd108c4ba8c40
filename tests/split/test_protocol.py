"""The split wire format: round trips, and every malformed message rejected by name."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from fedtune.split import protocol as wire
from fedtune.split.protocol import Kind, Limits, ProtocolError

H = 8
LIMITS = Limits(hidden_size=H, max_message_bytes=64 * 1024)


def _h(b: int = 2, t: int = 5, h: int = H, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, t, h, generator=torch.Generator().manual_seed(0)).to(dtype)


def _raw(header: dict, payload: bytes = b"") -> bytes:
    """A hand-built message, to say what a sender that bypasses ``encode`` could put on the wire."""
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + payload


def _forward_header(shape: list[int], dtype: str = "float32", itemsize: int = 4, valid_len: int = 2) -> dict:
    return {
        "v": 1,
        "kind": "FORWARD",
        "step": 1,
        "tensors": [
            {
                "name": "hidden",
                "dtype": dtype,
                "shape": shape,
                "nbytes": itemsize * shape[0] * shape[1] * shape[2],
            },
            {"name": "valid", "dtype": "int64", "shape": [valid_len], "nbytes": 8 * valid_len},
        ],
    }


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_round_trip_keeps_values_dtype_and_flags(dtype):
    # Prepare
    hidden, valid = _h(dtype=dtype), torch.tensor([5, 3])
    # Execute
    out = wire.decode(wire.encode(wire.forward(7, hidden, valid, train=False), LIMITS), LIMITS)
    # Assert
    assert (out.kind, out.step, out.train) == (Kind.FORWARD, 7, False)
    assert out.tensors["hidden"].dtype == dtype
    assert torch.equal(out.tensors["hidden"], hidden)
    assert torch.equal(out.tensors["valid"], valid) and out.tensors["valid"].dtype == torch.int64


@pytest.mark.parametrize(("make", "kind", "name"), [
    (wire.activation, Kind.ACTIVATION, "hidden"),
    (wire.backward, Kind.BACKWARD, "grad"),
    (wire.gradient, Kind.GRADIENT, "grad"),
])  # fmt: skip
def test_single_tensor_kinds_round_trip(make, kind, name):
    tensor = _h()
    out = wire.decode(wire.encode(make(3, tensor), LIMITS), LIMITS)
    assert (out.kind, out.step, list(out.tensors)) == (kind, 3, [name])
    assert torch.equal(out.tensors[name], tensor)


def test_error_round_trip_carries_the_text_and_no_tensor():
    out = wire.decode(wire.encode(wire.error(4, "valid: bad counts"), LIMITS), LIMITS)
    assert (out.kind, out.step, out.error, out.tensors) == (Kind.ERROR, 4, "valid: bad counts", {})


def test_message_size_is_header_plus_raw_tensor_bytes():
    data = wire.encode(wire.forward(1, _h(2, 5), torch.tensor([5, 3])), LIMITS)
    header, offset = wire.read_header(data, LIMITS)
    # 2 * 5 * 8 floats * 4 bytes + 2 counts * 8 bytes
    assert len(data) - offset == 320 + 16
    assert [t["name"] for t in header["tensors"]] == ["hidden", "valid"]


# -- rejections -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("hidden", "valid", "field"), [
    (torch.ones(2, 5, H, dtype=torch.int64), torch.tensor([5, 3]), "hidden: must be float32/float16"),
    (_h(h=H + 1), torch.tensor([5, 3]), "hidden: hidden size 9 != the model's 8"),
    (torch.randn(5, H), torch.tensor([5, 3]), "hidden: must be 3-D"),
    (_h(), torch.tensor([5, 0]), "valid: counts must lie in 1..5"),
    (_h(), torch.tensor([5, 6]), "valid: counts must lie in 1..5"),
    (_h(), torch.tensor([5, 3, 1]), "valid: shape (3,) != (2,)"),
    (_h(), torch.tensor([5, 3], dtype=torch.int32), "valid: counts must be int64"),
    (_h().index_fill(0, torch.tensor([1]), float("nan")), torch.tensor([5, 3]), "hidden: holds NaN"),
])  # fmt: skip
def test_encode_refuses_what_decode_would_reject(hidden, valid, field):
    with pytest.raises(ProtocolError, match=re.escape(field)):
        wire.encode(wire.forward(1, hidden, valid), LIMITS)


@pytest.mark.parametrize(("header", "payload", "field"), [
    # token ids dressed as activations: an integer "hidden"
    (_forward_header([2, 5, H], dtype="int64", itemsize=8), bytes(2 * 5 * H * 8 + 16), "hidden.dtype"),
    (_forward_header([2, 5, H + 1]), bytes(2 * 5 * (H + 1) * 4 + 16), "hidden: hidden size 9"),
    (_forward_header([2, 5, H], valid_len=3), bytes(2 * 5 * H * 4 + 24), "valid: shape"),
    (_forward_header([2, 5, H]), bytes(2 * 5 * H * 4 + 8), "valid: message ends 8 bytes early"),
    (_forward_header([2, 5, H]), bytes(2 * 5 * H * 4 + 16 + 4), "message: 4 trailing bytes"),
    (_forward_header([2, 5, H]), bytes(2 * 5 * H * 4 + 16), "valid: counts must lie in 1..5"),  # zeros
    ({**_forward_header([2, 5, H]), "text": "hello"}, b"", r"header: unknown fields \['text'\]"),
    ({**_forward_header([2, 5, H]), "kind": "LABELS"}, b"", "header.kind"),
    ({**_forward_header([2, 5, H]), "step": -1}, b"", "header.step"),
    ({**_forward_header([2, 5, H]), "v": 2}, b"", "header.v"),
    ({**_forward_header([2, 5, H]), "error": "x"}, b"", "header.error"),
    ({"v": 1, "kind": "BACKWARD", "step": 1, "tensors": [{"name": "labels"}]}, b"", "header.tensors"),
])  # fmt: skip
def test_decode_rejects_malformed_messages_naming_the_field(header, payload, field):
    with pytest.raises(ProtocolError, match=field):
        wire.decode(_raw(header, payload), LIMITS)


def test_decode_rejects_a_wrong_byte_count_before_reading_tensors():
    header = _forward_header([2, 5, H])
    header["tensors"][0]["nbytes"] = 4
    with pytest.raises(ProtocolError, match=r"hidden\.nbytes: 4 != 320"):
        wire.decode(_raw(header, bytes(336)), LIMITS)


@pytest.mark.parametrize("data", [b"", b"\x00\x00", struct.pack(">I", 10**6) + b"{}", _raw({}, b"")[:6]])
def test_decode_rejects_broken_framing(data):
    with pytest.raises(ProtocolError, match=r"^(message|header)"):
        wire.decode(data, LIMITS)


def test_oversized_message_is_refused_both_ways():
    # Prepare: 2 * 1024 * 8 floats * 4 bytes = 64 KiB of hidden states alone, over the 64 KiB limit
    big = _h(2, 1024)
    small_limits = Limits(H, max_message_bytes=1024 * 1024)
    data = wire.encode(wire.activation(1, big), small_limits)
    # Execute / Assert
    with pytest.raises(ProtocolError, match="exceeds the limit of 65536"):
        wire.encode(wire.activation(1, big), LIMITS)
    with pytest.raises(ProtocolError, match=r"message: 65\d+ bytes exceed the limit of 65536"):
        wire.decode(data, LIMITS)


def test_limits_are_checked():
    with pytest.raises(ValueError, match="hidden_size"):
        Limits(hidden_size=0)


# -- the generation cache field -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["new", "append"])
def test_cache_round_trip(mode):
    out = wire.decode(
        wire.encode(wire.forward(2, _h(), torch.tensor([5, 3]), train=False, cache=mode), LIMITS), LIMITS
    )
    assert (out.kind, out.train, out.cache) == (Kind.FORWARD, False, mode)


def test_append_counts_are_total_lengths_not_bounded_by_t():
    # Prepare: a decode step of one token per sample after prompts of 6 and 3 plus 4 generated
    hidden, valid = _h(2, 1), torch.tensor([11, 8])
    # Execute
    out = wire.decode(
        wire.encode(wire.forward(1, hidden, valid, train=False, cache="append"), LIMITS), LIMITS
    )
    # Assert: accepted with "append", the 1..T rule still holds without it and for "new"
    assert torch.equal(out.tensors["valid"], valid)
    for cache in (None, "new"):
        with pytest.raises(ProtocolError, match=re.escape("valid: counts must lie in 1..1")):
            wire.encode(wire.forward(1, hidden, valid, train=False, cache=cache), LIMITS)
    with pytest.raises(ProtocolError, match=re.escape("valid: counts must be >= 1, got [11, 0]")):
        wire.encode(wire.forward(1, hidden, torch.tensor([11, 0]), train=False, cache="append"), LIMITS)


@pytest.mark.parametrize(("changes", "field"), [
    ({"cache": "reset", "train": False}, "header.cache: must be one of ['new', 'append'], got 'reset'"),
    ({"cache": True, "train": False}, "header.cache: must be one of ['new', 'append'], got True"),
    ({"cache": None, "train": False}, "header.cache: must be one of ['new', 'append'], got None"),
    ({"cache": "new", "train": True}, "header.cache: allowed on FORWARD with train=false only, not on"),
    ({"cache": "new"}, "not on FORWARD with train=true"),  # train left out means a training FORWARD
    ({"cache": "append", "kind": "ACTIVATION"}, "not on ACTIVATION"),
])  # fmt: skip
def test_decode_rejects_a_bad_cache_field(changes, field):
    header = {**_forward_header([2, 5, H]), **changes}
    with pytest.raises(ProtocolError, match=re.escape(field)):
        wire.decode(_raw(header, bytes(2 * 5 * H * 4 + 16)), LIMITS)


def test_encode_refuses_a_cache_on_a_training_forward():
    with pytest.raises(ProtocolError, match=r"header\.cache: allowed on FORWARD with train=false only"):
        wire.encode(wire.forward(1, _h(), torch.tensor([5, 3]), cache="new"), LIMITS)
