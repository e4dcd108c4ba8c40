"""Blockwise 8-bit and 4-bit codes for adapters on the wire (``fed.wire_dtype`` int8 / nf4).

A tensor is flattened and cut into blocks of ``block`` values (the last one zero-padded for
the arithmetic; the padding is never sent). Each block ``b`` has a scale ``s_b``, its largest
magnitude, and every value ``x`` is sent as the index of the nearest level ``q`` of a codebook
on ``[-1, 1]``; it decodes to ``x̂ = q * s_b``:

- ``int8``: the 255 levels ``k / 127``, ``k = -127..127`` (symmetric absmax); one byte a value;
  ``|x - x̂| <= s_b / 254``;
- ``nf4``: QLoRA's 16-level NormalFloat codebook (Dettmers et al. 2023, :data:`NF4`), two
  codes a byte (low nibble first); ``|x - x̂| <= NF4_HALF_GAP * s_b`` (half the widest gap).

Scales are stored as a float32 tensor scale ``t = max_b s_b`` and a float16 ratio ``s_b / t``
per block, rounded *up* so no value lies outside its block's range: 2 bytes per block instead
of 4, which keeps int8 at 0.258 of float32 with 64-value blocks. A block's scale is then
``s_b = float32(ratio_b) * t`` on both sides. The encoding of one tensor (little-endian)::

    t: float32 | ratios: float16 x ceil(n / block) | codes: n bytes (int8) or ceil(n / 2) (nf4)

Pure numpy; :mod:`fedtune.federated.records` puts these bytes in a Flower ``Array``.
"""

from __future__ import annotations

import math

import numpy as np

from fedtune.errors import FedtuneError

FORMATS = ("int8", "nf4")

# QLoRA's NF4 levels (bitsandbytes ``create_normal_map``): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero; index 7 is 0.0
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_HALF_GAP = float(np.max(np.diff(NF4)) / 2)  # 0.1519: the worst rounding, as a share of s_b
INT8 = (np.arange(-127, 128, dtype=np.float32) / np.float32(127)).astype(np.float32)
_LEVELS = {"int8": INT8, "nf4": NF4}
_SCALE, _RATIO = np.dtype("<f4"), np.dtype("<f2")


MAX_BLOCK = 1 << 16  # a block is a few dozen values; a sender's huge one is refused


def _check(fmt: str, block: int) -> None:
    if fmt not in FORMATS:
        raise FedtuneError(f"unknown wire format {fmt!r} (blockwise formats: {', '.join(FORMATS)})")
    if not 1 <= block <= MAX_BLOCK:
        raise FedtuneError(f"wire block size must be in 1..{MAX_BLOCK}, got {block}")


def code_bytes(size: int, fmt: str) -> int:
    """Bytes of the codes of ``size`` values: one each (int8) or one per two (nf4)."""
    return size if fmt == "int8" else (size + 1) // 2


def encoded_size(size: int, fmt: str, block: int) -> int:
    """Bytes of a tensor of ``size`` values in ``fmt``: tensor scale, block ratios, codes."""
    _check(fmt, block)
    return _SCALE.itemsize + _RATIO.itemsize * math.ceil(size / block) + code_bytes(size, fmt)


def _scales(blocks: np.ndarray) -> tuple[np.float32, np.ndarray, np.ndarray]:
    """(tensor scale t, float16 ratios rounded up, the blocks' float32 scales ``ratio * t``)."""
    absmax = np.abs(blocks).max(axis=1)
    top = np.float32(absmax.max()) if absmax.size else np.float32(0)
    if top == 0:
        zeros = np.zeros(len(absmax), np.float32)
        return top, zeros.astype(_RATIO), zeros
    exact = absmax / top
    ratios = exact.astype(_RATIO)
    low = ratios.astype(np.float32) < exact
    ratios[low] = np.nextafter(ratios[low], np.float16(1))  # round up: every |x| <= s_b
    return top, ratios, ratios.astype(np.float32) * top


def quantise(values: np.ndarray, fmt: str, block: int) -> bytes:
    """``values`` (any shape, finite) in blockwise ``fmt``; see the module docstring for the layout."""
    _check(fmt, block)
    flat = np.asarray(values, dtype=np.float32).ravel()
    if not np.isfinite(flat).all():
        raise FedtuneError("cannot quantise NaN or Inf")
    n = flat.size
    padded = np.zeros(math.ceil(n / block) * block, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(-1, block)
    top, ratios, scales = _scales(blocks)
    unit = (blocks / np.where(scales > 0, scales, 1)[:, None]).ravel()[:n]  # in [-1, 1]
    codes: np.ndarray
    if fmt == "int8":
        codes = (np.clip(np.rint(unit * 127), -127, 127).astype(np.int8)).view(np.uint8)
    else:
        idx = np.searchsorted((NF4[1:] + NF4[:-1]) / 2, unit).astype(np.uint8)
        if n % 2:
            idx = np.append(idx, np.uint8(7))
        codes = idx[0::2] | (idx[1::2] << 4)
    return np.array(top, _SCALE).tobytes() + ratios.astype(_RATIO).tobytes() + codes.tobytes()


def dequantise(data: bytes, fmt: str, block: int, size: int) -> np.ndarray:
    """The ``size`` float32 values encoded in ``data`` (flat); a wrong length is refused."""
    expected = encoded_size(size, fmt, block)
    if len(data) != expected:
        raise FedtuneError(
            f"{fmt} data of {size} values in blocks of {block}: {len(data)} bytes, expected {expected}"
        )
    n_blocks = math.ceil(size / block)
    top = np.frombuffer(data, _SCALE, 1)[0]
    ratios = np.frombuffer(data, _RATIO, n_blocks, offset=_SCALE.itemsize)
    scales = ratios.astype(np.float32) * top
    raw = np.frombuffer(data, np.uint8, offset=_SCALE.itemsize + _RATIO.itemsize * n_blocks)
    idx: np.ndarray
    if fmt == "int8":
        idx = raw.view(np.int8).astype(np.int16) + 127
        if idx.size and idx.min() < 0:
            raise FedtuneError("int8 code -128 is not a level (codes are -127..127)")
    else:
        idx = np.stack([raw & 0x0F, raw >> 4], axis=1).ravel()[:size]
    values: np.ndarray = (_LEVELS[fmt][idx] * scales[np.arange(size) // block]).astype(np.float32)
    return values


def max_error(values: np.ndarray, fmt: str, block: int) -> np.ndarray:
    """The bound on ``|x - x̂|`` per value: s_b / 254 (int8) or ``NF4_HALF_GAP * s_b`` (nf4).

    ``s_b`` is the block's largest magnitude, plus what rounding its float16 ratio up may add:
    ``2**-10`` of it, or ``2**-24`` of the tensor scale where the ratio is subnormal.
    """
    _check(fmt, block)
    flat = np.asarray(values, dtype=np.float64).ravel()
    n = flat.size
    padded = np.zeros(math.ceil(n / block) * block)
    padded[:n] = np.abs(flat)
    absmax = padded.reshape(-1, block).max(axis=1)
    top = absmax.max() if absmax.size else 0.0
    s = np.repeat(absmax * (1 + 2**-10) + top * 2**-24, block)[:n]
    return s / 254 if fmt == "int8" else s * NF4_HALF_GAP


__all__ = [
    "FORMATS",
    "NF4",
    "NF4_HALF_GAP",
    "code_bytes",
    "dequantise",
    "encoded_size",
    "max_error",
    "quantise",
]
