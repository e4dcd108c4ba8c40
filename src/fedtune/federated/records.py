"""Adapters on the wire: state dicts <-> Flower ArrayRecords in the configured format.

An adapter travels packed, all its tensors in one ``Array``
(:mod:`fedtune.federated.protocol.tensors`: Flower moves each array as an object of its own).
``float16`` / ``float32`` tensors are their little-endian values; ``int8`` / ``nf4`` the scales
and codes of :mod:`fedtune.federated.quantize`, the format naming the block size
(``int8.b64``). A format this side does not know is refused, naming it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedtune.errors import FedtuneError
from fedtune.federated.protocol import ProtocolError
from fedtune.federated.protocol.tensors import Tensor, pack, unpack
from fedtune.federated.quantize import FORMATS, dequantise, quantise

WIRE_DTYPES: dict[str, np.dtype[np.floating]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_BLOCKWISE = re.compile(r"(\w+)\.b(\d+)")


def blockwise(wire_dtype: str) -> bool:
    """True for the blockwise formats (int8, nf4), whose replies carry the update (trained − sent)."""
    return wire_dtype in FORMATS


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _format(wire_dtype: str, block: int | None) -> str:
    """The packed record's format name: the dtype, or a blockwise format with its block size."""
    if wire_dtype in WIRE_DTYPES:
        return wire_dtype
    if blockwise(wire_dtype) and block is not None:
        return f"{wire_dtype}.b{block}"
    raise FedtuneError(
        f"wire format {wire_dtype!r}"
        + (" needs a block size" if blockwise(wire_dtype) else " is unknown")
        + f" (fed.wire_dtype: {', '.join([*WIRE_DTYPES, *FORMATS])})"
    )


def to_record(
    state: Mapping[str, torch.Tensor | np.ndarray], wire_dtype: str, block: int | None = None
) -> ArrayRecord:
    """Pack an adapter for sending in ``wire_dtype`` (fp16 halves the bytes; int8/nf4 need ``block``)."""
    fmt = _format(wire_dtype, block)
    tensors = []
    for key, value in state.items():
        arr = _numpy(value)
        if wire_dtype in WIRE_DTYPES:
            data = np.ascontiguousarray(arr, dtype=WIRE_DTYPES[wire_dtype]).tobytes()
        else:
            data = quantise(arr, wire_dtype, block)  # type: ignore[arg-type]
        tensors.append(Tensor(key, tuple(int(d) for d in arr.shape), data))
    return pack(fmt, tensors)


def _decode(fmt: str, t: Tensor, where: str) -> np.ndarray:
    """One tensor's values as float32; a ProtocolError names an unknown format or bad data."""
    size = math.prod(t.shape)
    if fmt in WIRE_DTYPES:
        need = size * WIRE_DTYPES[fmt].itemsize
        if len(t.data) != need:
            raise ProtocolError(
                f"{where}: {t.key!r}: {fmt} data of {size} values is {len(t.data)} bytes, expected {need}"
            )
        values: np.ndarray = np.frombuffer(t.data, dtype=WIRE_DTYPES[fmt])
        return values.astype(np.float32).reshape(t.shape)
    match = _BLOCKWISE.fullmatch(fmt)
    if match is None or match[1] not in FORMATS:
        raise ProtocolError(f"{where}: unknown wire format {fmt!r}")
    try:
        return dequantise(t.data, match[1], int(match[2]), size).reshape(t.shape)
    except FedtuneError as err:
        raise ProtocolError(f"{where}: {t.key!r}: {err}") from None


def from_record(
    record: ArrayRecord,
    *,
    check_finite: bool = True,
    delta_of: Mapping[str, np.ndarray] | None = None,
    where: str = "adapter",
) -> dict[str, np.ndarray]:
    """Unpack to float32 numpy arrays, refusing non-finite values unless told not to.

    ``delta_of``: the record is an update (a delta-coded reply); the result is ``delta_of`` plus
    it, key by key; an update whose keys or shapes differ is a ProtocolError naming ``where``.
    """
    fmt, tensors = unpack(record, where)
    out = {}
    for tensor in tensors:
        value = _decode(fmt, tensor, where)
        if check_finite and not np.isfinite(value).all():
            raise FedtuneError(f"adapter weight {tensor.key} contains NaN or Inf")
        out[tensor.key] = value
    return out if delta_of is None else _added(delta_of, out, where)


def shapes(record: ArrayRecord, where: str = "adapter") -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, without decoding the values."""
    return {t.key: t.shape for t in unpack(record, where)[1]}


def _added(
    reference: Mapping[str, np.ndarray], update: dict[str, np.ndarray], where: str
) -> dict[str, np.ndarray]:
    if update.keys() != reference.keys():
        raise ProtocolError(f"{where}: the update's keys differ from the adapter it was sent")
    for k, v in update.items():
        if v.shape != reference[k].shape:
            raise ProtocolError(
                f"{where}: update {k!r} has shape {v.shape}, the adapter sent {reference[k].shape}"
            )
    return {k: (reference[k] + v).astype(np.float32) for k, v in update.items()}


def to_torch(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The arrays as float32 torch tensors (copies: the tensors own their memory)."""
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
