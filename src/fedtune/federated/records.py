"""Adapters on the wire: state dicts <-> Flower ArrayRecords in the configured format.

``float16`` / ``float32`` travel as numpy arrays (Flower's own ``numpy.ndarray`` encoding);
``int8`` / ``nf4`` as one ``Array`` per tensor whose ``stype`` names the format and block
size (``fedtune.int8.b64``) and whose data holds the scales and the codes
(:mod:`fedtune.federated.quantize`), with the tensor's own shape, so a tensor costs one array
as before. An array in a format this side does not know is refused, naming its key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedtune.errors import FedtuneError
from fedtune.federated.protocol import ProtocolError
from fedtune.federated.quantize import FORMATS, dequantise, quantise

WIRE_DTYPES = {"float16": np.float16, "float32": np.float32}
NUMPY_STYPE = "numpy.ndarray"  # Flower's serialisation of an ndarray (Array(ndarray))
_BLOCKWISE = re.compile(r"fedtune\.(\w+)\.b(\d+)")


def blockwise(wire_dtype: str) -> bool:
    """True for the blockwise formats (int8, nf4), whose replies carry the update (trained − sent)."""
    return wire_dtype in FORMATS


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def to_record(
    state: Mapping[str, torch.Tensor | np.ndarray], wire_dtype: str, block: int | None = None
) -> ArrayRecord:
    """Pack an adapter for sending in ``wire_dtype`` (fp16 halves the bytes; int8/nf4 need ``block``)."""
    arrays = {}
    for key, value in state.items():
        arr = _numpy(value)
        if wire_dtype in WIRE_DTYPES:
            arrays[key] = Array(np.ascontiguousarray(arr.astype(WIRE_DTYPES[wire_dtype])))
        elif blockwise(wire_dtype) and block is not None:
            stype = f"fedtune.{wire_dtype}.b{block}"
            arrays[key] = Array(
                "float32", tuple(int(d) for d in arr.shape), stype, quantise(arr, wire_dtype, block)
            )
        else:
            raise FedtuneError(
                f"wire format {wire_dtype!r}"
                + (" needs a block size" if blockwise(wire_dtype) else " is unknown")
                + f" (fed.wire_dtype: {', '.join([*WIRE_DTYPES, *FORMATS])})"
            )
    return ArrayRecord(arrays)


def _decode(key: str, array: Array) -> np.ndarray:
    """One array as float32; a format this side does not know is a ProtocolError naming ``key``."""
    if array.stype == NUMPY_STYPE:
        return array.numpy().astype(np.float32)
    match = _BLOCKWISE.fullmatch(array.stype)
    if match is None or match[1] not in FORMATS:
        raise ProtocolError(f"adapter weight {key!r}: unknown wire format {array.stype!r}")
    shape = tuple(array.shape)
    try:
        flat = dequantise(array.data, match[1], int(match[2]), math.prod(shape))
    except FedtuneError as err:
        raise ProtocolError(f"adapter weight {key!r}: {err}") from None
    return flat.reshape(shape)


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
    out = {}
    for key, array in record.items():
        value = _decode(key, array)
        if check_finite and not np.isfinite(value).all():
            raise FedtuneError(f"adapter weight {key} contains NaN or Inf")
        out[key] = value
    return out if delta_of is None else _added(delta_of, out, where)


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
