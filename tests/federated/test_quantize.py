"""Blockwise int8 / nf4 codes: hand-worked blocks, bounds, padding, zeros, odd lengths, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.errors import FedtuneError
from fedtune.federated.quantize import NF4, NF4_HALF_GAP, dequantise, encoded_size, max_error, quantise


def _round_trip(values, fmt: str, block: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    return dequantise(quantise(values, fmt, block), fmt, block, values.size)


def test_int8_one_block_by_hand() -> None:
    # Prepare: one block of 4, absmax 1.0 -> scale 1.0, levels k / 127
    values = np.array([1.0, -0.5, 0.25, 0.003], dtype=np.float32)

    # Execute
    data = quantise(values, "int8", 4)

    # Assert: codes rint(127 x) = 127, -64 (-63.5 to even), 32, 0 (0.381)
    assert data[:4] == np.float32(1.0).tobytes()  # the tensor scale t
    assert data[4:6] == np.float16(1.0).tobytes()  # the block's ratio s_b / t
    assert list(np.frombuffer(data[6:], np.int8)) == [127, -64, 32, 0]
    np.testing.assert_allclose(dequantise(data, "int8", 4, 4), [1.0, -64 / 127, 32 / 127, 0.0], rtol=1e-6)


def test_int8_two_blocks_have_their_own_scales() -> None:
    # Prepare: blocks [2, 1] and [0.5, -0.25]: t = 2, ratios 1 and 0.25, scales 2 and 0.5
    values = np.array([2.0, 1.0, 0.5, -0.25], dtype=np.float32)

    # Execute
    data = quantise(values, "int8", 2)

    # Assert: 1.0 / 2 x 127 = 63.5 -> 64; -0.25 / 0.5 x 127 = -63.5 -> -64
    assert list(np.frombuffer(data[4:8], np.float16)) == [1.0, 0.25]
    assert list(np.frombuffer(data[8:], np.int8)) == [127, 64, 127, -64]
    expected = [2.0, 2 * 64 / 127, 0.5, -0.5 * 64 / 127]
    np.testing.assert_allclose(dequantise(data, "int8", 2, 4), expected, rtol=1e-6)


def test_nf4_block_by_hand_packs_two_codes_a_byte() -> None:
    # Prepare: scale 1.0; nearest NF4 levels: 1.0 -> 15, 0.5 -> 12 (0.4407; the midpoint to
    # 0.5626 is 0.5017), -0.1 -> 6 (-0.0911), 0.0 -> 7, 0.3 -> 11 (0.3379; midpoint 0.2920)
    values = np.array([1.0, 0.5, -0.1, 0.0, 0.3], dtype=np.float32)

    # Execute
    data = quantise(values, "nf4", 8)

    # Assert: low nibble first; the odd fifth code is padded with 7 (zero)
    assert len(data) == 4 + 2 + 3
    assert list(data[6:]) == [15 | 12 << 4, 6 | 7 << 4, 11 | 7 << 4]
    np.testing.assert_array_equal(dequantise(data, "nf4", 8, 5), NF4[[15, 12, 6, 7, 11]])


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_round_trip_within_the_bound(fmt: str) -> None:
    # Prepare: values over ten orders of magnitude, several blocks with very different scales
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=200) * 10.0**e for e in range(-8, 3)]).astype(np.float32)

    # Execute
    back = _round_trip(values, fmt, 64)

    # Assert: |x - x̂| <= s_b / 254 (int8) or 0.152 s_b (nf4), and the bound is not loose
    err = np.abs(back - values)
    bound = max_error(values, fmt, 64)
    assert (err <= bound).all()
    assert err.max() > 0.3 * bound.max()
    assert pytest.approx((1 - 0.6961928) / 2) == NF4_HALF_GAP


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_last_partial_block_is_padded_for_the_arithmetic_only(fmt: str) -> None:
    # Prepare: 5 values in blocks of 4: the second block holds 0.5 alone
    values = np.array([4.0, 3.0, 2.0, 1.0, 0.5], dtype=np.float32)

    # Execute
    data = quantise(values, fmt, 4)

    # Assert: two ratios, codes for 5 values only; 0.5 is its block's absmax, exact
    codes = 5 if fmt == "int8" else 3
    assert len(data) == encoded_size(5, fmt, 4) == 4 + 2 * 2 + codes
    assert list(np.frombuffer(data[4:8], np.float16)) == [1.0, 0.125]
    assert dequantise(data, fmt, 4, 5)[4] == 0.5


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_zero_blocks_and_zero_tensors_decode_to_zero(fmt: str) -> None:
    # Prepare / Execute
    mixed = _round_trip([0, 0, 0, 0, 1, -1, 1, -1], fmt, 4)
    zeros = _round_trip(np.zeros(7), fmt, 4)

    # Assert
    np.testing.assert_array_equal(mixed, [0, 0, 0, 0, 1, -1, 1, -1])
    np.testing.assert_array_equal(zeros, np.zeros(7))
    assert _round_trip(np.zeros(0), fmt, 4).shape == (0,)


@pytest.mark.parametrize("size", [1, 3, 63, 65, 129])
def test_nf4_odd_lengths(size: int) -> None:
    # Prepare
    values = np.random.default_rng(size).normal(size=size).astype(np.float32)

    # Execute
    data = quantise(values, "nf4", 64)

    # Assert: ceil(size / 2) code bytes; every value comes back within the bound
    assert len(data) == 4 + 2 * -(-size // 64) + (size + 1) // 2
    back = dequantise(data, "nf4", 64, size)
    assert back.shape == (size,)
    assert (np.abs(back - values) <= max_error(values, "nf4", 64)).all()


def test_float16_ratio_is_rounded_up_so_no_value_is_clipped() -> None:
    # Prepare: a block whose ratio 1/3 is not a float16 (float16(1/3) = 0.33325 < 1/3)
    values = np.array([1.0, 1 / 3], dtype=np.float32)

    # Execute
    data = quantise(values, "int8", 1)

    # Assert: the stored ratio is the next float16 above 1/3; 1/3 decodes within s_b / 254
    ratio = np.frombuffer(data[6:8], np.float16)[0]
    assert ratio == np.nextafter(np.float16(1 / 3), np.float16(1)) and float(ratio) > 1 / 3
    assert abs(_round_trip(values, "int8", 1)[1] - 1 / 3) <= float(ratio) / 254


def test_bad_input_is_refused() -> None:
    good = quantise(np.ones(4, np.float32), "int8", 4)
    with pytest.raises(FedtuneError, match="11 bytes, expected 10"):
        dequantise(good + b"\x00", "int8", 4, 4)
    with pytest.raises(FedtuneError, match="code -128 is not a level"):
        dequantise(good[:-1] + b"\x80", "int8", 4, 4)
    with pytest.raises(FedtuneError, match="unknown wire format 'int4'"):
        quantise(np.ones(4), "int4", 4)
    with pytest.raises(FedtuneError, match="NaN or Inf"):
        quantise(np.array([1.0, np.inf]), "nf4", 4)
    with pytest.raises(FedtuneError, match=r"in 1\.\.65536"):
        quantise(np.ones(4), "int8", 0)
