"""The wire format between a split client and the trunk service: pure encode / decode, strictly checked.

One message is one gRPC stream item (raw bytes)::

    [4-byte big-endian header length][header: UTF-8 JSON][tensor bytes, in header order]

The header names the message ``kind``, the ``step`` it belongs to and each tensor's name, dtype,
shape and byte count. Only four tensor-carrying kinds exist, each with a fixed set of tensors:

========== =================== ====================================================
kind        direction            tensors
========== =================== ====================================================
FORWARD     client -> server     ``hidden`` float (B, T, H) = h1, ``valid`` int64 (B,)
ACTIVATION  server -> client     ``hidden`` float (B, T, H) = h2
BACKWARD    client -> server     ``grad`` float (B, T, H) = dL/dh2
GRADIENT    server -> client     ``grad`` float (B, T, H) = dL/dh1
ERROR       server -> client     none; the header carries ``error`` (a message)
========== =================== ====================================================

A FORWARD with ``train`` false may also name a ``cache`` for KV-cached generation: ``"new"``
prefills (starts the session's trunk cache from this prompt's hidden states), ``"append"`` runs a
decode step on that cache. In an ``"append"`` the counts are each sample's total length so far
(prompt + generated), so they exceed T; here they are only checked to be ``>= 1``, and the trunk
checks them against its cache.

So by construction a message can carry float activations or gradients and int64 counts, never
token ids, labels or text. :func:`decode` checks all of it before a single tensor is built, and
raises :class:`ProtocolError` naming the field at fault.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor

from fedtune.errors import FedtuneError

VERSION = 1
_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024  # a header lists at most two tensors: a few hundred bytes in practice
MAX_ERROR_CHARS = 2000

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
COUNT_DTYPE = "int64"
CACHE_MODES = ("new", "append")  # FORWARD ``cache``: prefill a fresh KV cache, or decode on it


class ProtocolError(FedtuneError):
    """A message that breaks the wire format; the text names the offending field."""


class Kind(StrEnum):
    """A message's kind (its header's ``kind``); the module docstring's table says who sends which."""

    FORWARD = "FORWARD"
    ACTIVATION = "ACTIVATION"
    BACKWARD = "BACKWARD"
    GRADIENT = "GRADIENT"
    ERROR = "ERROR"


# The tensors each kind carries, in wire order; "valid" is the only non-float tensor there is.
TENSORS: dict[Kind, tuple[str, ...]] = {
    Kind.FORWARD: ("hidden", "valid"),
    Kind.ACTIVATION: ("hidden",),
    Kind.BACKWARD: ("grad",),
    Kind.GRADIENT: ("grad",),
    Kind.ERROR: (),
}
_HEADER_KEYS = {"v", "kind", "step", "tensors", "train", "error", "cache"}
_TENSOR_KEYS = {"name", "dtype", "shape", "nbytes"}


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts: the model's hidden size and the largest message."""

    hidden_size: int
    max_message_bytes: int = 256 * 1024 * 1024  # 256 MiB: fp32 (8, 2048, 4096) is 256 MiB exactly

    def __post_init__(self) -> None:
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {self.hidden_size}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {self.max_message_bytes}")


@dataclass(frozen=True)
class Message:
    """A decoded (or to-be-encoded) message; ``tensors`` follow :data:`TENSORS` for ``kind``."""

    kind: Kind
    step: int
    tensors: dict[str, Tensor] = field(default_factory=dict)
    train: bool = True  # FORWARD only: False runs the trunk without keeping a graph (eval, generation)
    error: str = ""  # ERROR only
    cache: str | None = None  # FORWARD with train=False only: one of CACHE_MODES, None: no KV cache


def forward(
    step: int, hidden: Tensor, valid: Tensor, *, train: bool = True, cache: str | None = None
) -> Message:
    """Client -> server: h1 (B, T, H) and each sample's valid length (B,), for step ``step``."""
    return Message(Kind.FORWARD, step, {"hidden": hidden, "valid": valid}, train=train, cache=cache)


def activation(step: int, hidden: Tensor) -> Message:
    """Server -> client: the trunk's output h2 for step ``step``."""
    return Message(Kind.ACTIVATION, step, {"hidden": hidden})


def backward(step: int, grad: Tensor) -> Message:
    """Client -> server: dL/dh2 for step ``step``."""
    return Message(Kind.BACKWARD, step, {"grad": grad})


def gradient(step: int, grad: Tensor) -> Message:
    """Server -> client: dL/dh1 for step ``step``."""
    return Message(Kind.GRADIENT, step, {"grad": grad})


def error(step: int, text: str) -> Message:
    """Server -> client: what went wrong at step ``step``, cut to ``MAX_ERROR_CHARS`` characters."""
    return Message(Kind.ERROR, step, error=text[:MAX_ERROR_CHARS])


# -- encode ---------------------------------------------------------------------------------------


def encode(message: Message, limits: Limits) -> bytes:
    """Serialise ``message`` after checking it as :func:`decode` would: a sender never emits junk."""
    if message.cache is not None:
        _check_cache(message.kind, message.train, message.cache)
    _check_tensors(message.kind, message.tensors, limits, message.cache)
    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in TENSORS[message.kind]:
        tensor = message.tensors[name].detach().to("cpu").contiguous()
        blob = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        specs.append(
            {"name": name, "dtype": _dtype_name(tensor), "shape": list(tensor.shape), "nbytes": len(blob)}
        )
        blobs.append(blob)
    header: dict[str, Any] = {
        "v": VERSION,
        "kind": message.kind.value,
        "step": message.step,
        "tensors": specs,
    }
    if message.kind is Kind.FORWARD:
        header["train"] = message.train
    if message.cache is not None:
        header["cache"] = message.cache
    if message.kind is Kind.ERROR:
        header["error"] = message.error
    head = json.dumps(header, separators=(",", ":")).encode()
    data = b"".join([_LEN.pack(len(head)), head, *blobs])
    if len(data) > limits.max_message_bytes:
        raise ProtocolError(
            f"message: {message.kind.value} of {len(data)} bytes exceeds the limit of "
            f"{limits.max_message_bytes} (split the batch)"
        )
    return data


# -- decode ---------------------------------------------------------------------------------------


def read_header(data: bytes, limits: Limits) -> tuple[dict[str, Any], int]:
    """The checked header of ``data`` and where its tensor bytes start; no tensor is built."""
    if len(data) > limits.max_message_bytes:
        raise ProtocolError(f"message: {len(data)} bytes exceed the limit of {limits.max_message_bytes}")
    if len(data) < _LEN.size:
        raise ProtocolError(f"message: {len(data)} bytes is too short for a header length")
    (head_len,) = _LEN.unpack_from(data)
    if head_len > MAX_HEADER_BYTES or _LEN.size + head_len > len(data):
        raise ProtocolError(f"header: length {head_len} does not fit a {len(data)}-byte message")
    try:
        header = json.loads(data[_LEN.size : _LEN.size + head_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"header: not UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header: must be a JSON object")
    unknown = sorted(set(header) - _HEADER_KEYS)
    if unknown:
        raise ProtocolError(f"header: unknown fields {unknown}")
    if header.get("v") != VERSION:
        raise ProtocolError(f"header.v: protocol version {header.get('v')!r}, expected {VERSION}")
    kinds = [k.value for k in Kind]
    if header.get("kind") not in kinds:
        raise ProtocolError(f"header.kind: {header.get('kind')!r} is not one of {kinds}")
    kind = Kind(header["kind"])
    step = header.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ProtocolError(f"header.step: must be a non-negative integer, got {step!r}")
    if "train" in header and (kind is not Kind.FORWARD or not isinstance(header["train"], bool)):
        raise ProtocolError("header.train: a boolean, allowed on FORWARD only")
    if "error" in header and (kind is not Kind.ERROR or not isinstance(header["error"], str)):
        raise ProtocolError("header.error: a string, allowed on ERROR only")
    if "cache" in header:
        _check_cache(kind, header.get("train", True), header["cache"])
    specs = header.get("tensors")
    names = (
        [s.get("name") if isinstance(s, dict) else None for s in specs] if isinstance(specs, list) else None
    )
    if names != list(TENSORS[kind]):
        expected = list(TENSORS[kind])
        raise ProtocolError(f"header.tensors: {kind.value} carries exactly {expected}, got {names}")
    return header, _LEN.size + head_len


def decode(data: bytes, limits: Limits) -> Message:
    """Parse and check one message; raises :class:`ProtocolError` naming the field at fault.

    Checks, in order: total size, header framing and fields, each tensor's dtype (float for
    ``hidden`` / ``grad``, int64 for ``valid``), shape (3-D with the model's hidden size; counts
    (B,) in 1..T, or just >= 1 in a cache ``"append"``) and byte count, and that the tensor bytes
    fill the message exactly.
    """
    header, offset = read_header(data, limits)
    kind = Kind(header["kind"])
    tensors: dict[str, Tensor] = {}
    for spec in header["tensors"]:
        name = spec["name"]
        unknown = sorted(set(spec) - _TENSOR_KEYS)
        if unknown:
            raise ProtocolError(f"{name}: unknown tensor fields {unknown}")
        dtype = _wire_dtype(name, spec.get("dtype"))
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ProtocolError(f"{name}.shape: must be a list of non-negative integers, got {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if spec.get("nbytes") != nbytes:
            raise ProtocolError(f"{name}.nbytes: {spec.get('nbytes')!r} != {nbytes} for shape {shape}")
        if offset + nbytes > len(data):
            raise ProtocolError(f"{name}: message ends {offset + nbytes - len(data)} bytes early")
        # bytearray: torch wants a writable buffer, and the tensor must not alias the message
        raw = bytearray(data[offset : offset + nbytes])
        flat = torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
        offset += nbytes
    if offset != len(data):
        raise ProtocolError(f"message: {len(data) - offset} trailing bytes after the tensors")
    _check_tensors(kind, tensors, limits, header.get("cache"))
    return Message(
        kind, header["step"], tensors, header.get("train", True), header.get("error", ""), header.get("cache")
    )


# -- checks shared by both directions -------------------------------------------------------------


def _check_cache(kind: Kind, train: object, cache: object) -> None:
    if not isinstance(cache, str) or cache not in CACHE_MODES:
        raise ProtocolError(f"header.cache: must be one of {list(CACHE_MODES)}, got {cache!r}")
    if kind is not Kind.FORWARD or train is not False:
        got = f"FORWARD with train={str(train).lower()}" if kind is Kind.FORWARD else kind.value
        raise ProtocolError(f"header.cache: allowed on FORWARD with train=false only, not on {got}")


def _check_tensors(kind: Kind, tensors: dict[str, Tensor], limits: Limits, cache: str | None = None) -> None:
    if sorted(tensors) != sorted(TENSORS[kind]):
        raise ProtocolError(f"{kind.value}: carries exactly {list(TENSORS[kind])}, got {sorted(tensors)}")
    for name in TENSORS[kind]:
        if name == "valid":
            continue
        t = tensors[name]
        if _dtype_name(t) not in FLOAT_DTYPES:
            raise ProtocolError(f"{name}: must be {'/'.join(FLOAT_DTYPES)}, got {t.dtype}")
        if t.ndim != 3:
            raise ProtocolError(f"{name}: must be 3-D (batch, seq, hidden), got shape {tuple(t.shape)}")
        if t.shape[-1] != limits.hidden_size:
            raise ProtocolError(f"{name}: hidden size {t.shape[-1]} != the model's {limits.hidden_size}")
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise ProtocolError(f"{name}: empty batch or sequence, shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"{name}: holds NaN or infinite values")
    if kind is Kind.FORWARD:
        valid, batch, seq = tensors["valid"], *tensors["hidden"].shape[:2]
        if valid.dtype != torch.int64:
            raise ProtocolError(f"valid: counts must be {COUNT_DTYPE}, got {valid.dtype}")
        if tuple(valid.shape) != (batch,):
            raise ProtocolError(f"valid: shape {tuple(valid.shape)} != ({batch},), one count per sample")
        if cache == "append":  # total lengths so far: the trunk checks them against its cache
            if bool((valid < 1).any()):
                raise ProtocolError(f"valid: counts must be >= 1, got {valid.tolist()}")
        elif bool((valid < 1).any()) or bool((valid > seq).any()):
            raise ProtocolError(f"valid: counts must lie in 1..{seq}, got {valid.tolist()}")


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _wire_dtype(name: str, dtype: object) -> torch.dtype:
    if name == "valid":
        if dtype != COUNT_DTYPE:
            raise ProtocolError(f"valid.dtype: counts must be {COUNT_DTYPE}, got {dtype!r}")
        return torch.int64
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise ProtocolError(f"{name}.dtype: must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
    return FLOAT_DTYPES[dtype]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "CACHE_MODES",
    "TENSORS",
    "Kind",
    "Limits",
    "Message",
    "ProtocolError",
    "activation",
    "backward",
    "decode",
    "encode",
    "error",
    "forward",
    "gradient",
    "read_header",
]
