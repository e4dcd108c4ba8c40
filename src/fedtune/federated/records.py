"""Adapters on the wire: state dicts <-> Flower ArrayRecords in the configured dtype."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedtune.errors import FedtuneError

WIRE_DTYPES = {"float16": np.float16, "float32": np.float32}


def to_record(state: Mapping[str, torch.Tensor | np.ndarray], wire_dtype: str) -> ArrayRecord:
    """Pack an adapter for sending; values are cast to ``wire_dtype`` (fp16 halves the bytes)."""
    dtype = WIRE_DTYPES[wire_dtype]
    arrays = {}
    for key, value in state.items():
        arr = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        arrays[key] = Array(np.ascontiguousarray(arr.astype(dtype)))
    return ArrayRecord(arrays)


def from_record(record: ArrayRecord, *, check_finite: bool = True) -> dict[str, np.ndarray]:
    """Unpack to float32 numpy arrays, refusing non-finite values unless told not to."""
    out = {}
    for key, array in record.items():
        value = array.numpy().astype(np.float32)
        if check_finite and not np.isfinite(value).all():
            raise FedtuneError(f"adapter weight {key} contains NaN or Inf")
        out[key] = value
    return out


def to_torch(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The arrays as float32 torch tensors (copies: the tensors own their memory)."""
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
